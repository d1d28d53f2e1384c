"""Bytes of the model payload as NVFlare serialises it, measured at the site in both directions.

Place :class:`WireBytes` twice in a client's ``config_fed_client.json``: first among the
``task_data_filters`` of ``train`` (``direction: "down"``: the global model as the server sent
it, before any site-side filter such as a dequantizer), and last among its
``task_result_filters`` (``direction: "up"``: the update as it leaves, after every filter such
as a quantizer). Each serialises the task's Shareable with FOBS (NVFlare's own serialiser, the
tensors inline, as a message carries them) and counts its bytes; the result carries both counts in its headers
(:data:`DOWN_HEADER`, :data:`UP_HEADER`) and the server's records show them beside the
parameter-count figure. The overhead over the raw tensor bytes is the Shareable's headers and
FOBS framing (about 2.4 kB for ten tensors).
"""

from __future__ import annotations

from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.decomposers.numpy_decomposers import NumpyArrayDecomposer
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

DOWN_HEADER = "fedfms_wire_bytes_down"  # the global model the site received
UP_HEADER = "fedfms_wire_bytes_up"  # the update the site sent
_DOWN_PROP = "fedfms_wire_bytes_down"  # carried from the task-data filter to the result filter of the same task
DIRECTIONS = ("down", "up")
fobs.register(TensorDecomposer)  # a payload holds torch tensors (sites) or NumPy arrays (the server's persistor)
fobs.register(NumpyArrayDecomposer)


def serialised_bytes(shareable: Shareable) -> int:
    """Bytes of ``shareable`` as FOBS serialises it."""
    return len(fobs.dumps(shareable))


class WireBytes(Filter):
    """Counts the serialised bytes of a task's data (``down``) or result (``up``); see the module docstring.

    Args:
        direction: ``down`` in ``task_data_filters``, ``up`` in ``task_result_filters``.
    """

    def __init__(self, direction: str) -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        self.direction = direction

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        size = serialised_bytes(shareable)
        if self.direction == "down":
            fl_ctx.set_prop(_DOWN_PROP, size, private=True, sticky=False)
        else:
            shareable.set_header(DOWN_HEADER, fl_ctx.get_prop(_DOWN_PROP))
            shareable.set_header(UP_HEADER, size)
        return shareable


def wire_bytes(result: Shareable) -> tuple[int | None, int | None]:
    """(down, up) bytes a site's filters measured for this task; None where the job has no such filter."""
    return result.get_header(DOWN_HEADER), result.get_header(UP_HEADER)
