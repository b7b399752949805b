"""CosPress: cosine-similarity-preserving compression (Mannix, Hodgkinson & Bondell).

A teacher head ``h`` (:class:`~featkd.TeacherCompressionHead`) compresses the teacher's features
into the student's width while keeping each vector's cosine-similarity neighbourhood; the student
then matches the compressed teacher directly with a cosine loss.

Head terms (train ``h`` only; the head sees ``sg(teacher)``): for a set of vectors ``X``,
``D = n(X) n(X)^T`` with ``n`` the L2 normalisation and the diagonal masked by subtracting
``1e8`` (a finite mask: ``-inf`` would give ``0 * inf = NaN`` in the KL). For each temperature
``tau``: ``p_{j|i} = softmax_j(D_ij / tau)`` from the teacher, ``q_{j|i}`` from ``h(teacher)``,
symmetrised ``P_ij = (p_{j|i} + p_{i|j}) / 2M`` (kept in log space), and the term
is ``KL(P || Q)`` averaged over the temperatures (``style="half"``: the mean over rows of
``KL(p_{.|i} || q_{.|i})``, no symmetrisation). The local term uses the tokens of each image and
averages over images; the global term uses the batch's CLS vectors.

Student terms (train the student only): ``1 - cos(vec(S_b), vec(sg(h(T_b))))`` with ``vec``
flattening all tokens of one image into one vector, averaged over the batch; and the same on the
CLS token alone.

The official code follows this, not a naive reading of the paper; the log-space symmetrisation,
the finite diagonal mask and the temperatures ``0.01, 0.02, ..., 0.10`` are from it.

Proteus, the feature-regression baseline CosPress is compared against, lives here too.

Modules: :mod:`~featkd.cospress.loss` (:func:`cospress_loss`, :class:`CosPressLoss`),
:mod:`~featkd.cospress.proteus` (:func:`proteus_loss`, :class:`ProteusLoss`),
:mod:`~featkd.cospress.heads` (:class:`TeacherCompressionHead`, :class:`LinearHead`),
:mod:`~featkd.cospress.distances` (:func:`neighbourhood_kl`, :func:`flat_cosine_loss`); the
private ``_neighbourhood`` (the KL's autograd function) and ``_cosine`` (unit vectors with a
bounded gradient) below them.
"""

from featkd.cospress._neighbourhood import DEFAULT_CHUNK_ELEMENTS, DEFAULT_TEMPERATURES, KL_STYLES
from featkd.cospress.distances import flat_cosine_loss, neighbourhood_kl
from featkd.cospress.heads import LinearHead, TeacherCompressionHead
from featkd.cospress.loss import CosPressLoss, cospress_loss
from featkd.cospress.proteus import ProteusLoss, proteus_loss

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_TEMPERATURES",
    "KL_STYLES",
    "CosPressLoss",
    "LinearHead",
    "ProteusLoss",
    "TeacherCompressionHead",
    "cospress_loss",
    "flat_cosine_loss",
    "neighbourhood_kl",
    "proteus_loss",
]
