"""The one place that touches PEFT internals: the ``PeftType`` member and the method registration.

PEFT's ``PeftType`` enum has no extension hook, so we add the member ``SPARSE_ADAPTER`` (name == value, like
every built-in member, so JSON configs and hashing work) directly to the enum's member tables. Both steps are
idempotent: importing ``peft_sparse`` twice, or reloading it, changes nothing the second time.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "SPARSE_ADAPTER"
METHOD_NAME = "sparse_adapter"
PREFIX = "sparse_adapter_"


def _add_peft_type_member() -> PeftType:
    """Add ``PeftType.SPARSE_ADAPTER`` if it is missing and return it."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def register() -> PeftType:
    """Register the sparse adapter tuner with PEFT (safe to call repeatedly)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import SparseAdapterConfig
    from .model import SparseAdapterModel

    peft_type = _add_peft_type_member()
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(
            name=METHOD_NAME, config_cls=SparseAdapterConfig, model_cls=SparseAdapterModel, prefix=PREFIX
        )
    return peft_type


# Private PEFT helpers the tuner relies on; imported here so no other module reaches into PEFT internals.
from peft.tuners._buffer_dict import BufferDict  # noqa: E402
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers  # noqa: E402
from peft.utils.integrations import gather_params_ctx  # noqa: E402  (DeepSpeed ZeRO-3 parameter gathering)

__all__ = [
    "BufferDict",
    "METHOD_NAME",
    "PEFT_TYPE_NAME",
    "PREFIX",
    "_maybe_include_all_linear_layers",
    "gather_params_ctx",
    "register",
]
