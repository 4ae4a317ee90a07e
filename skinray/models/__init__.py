"""The model registry and every registered model.

>>> from skinray.models import create_model, list_models
>>> list_models()  # doctest: +ELLIPSIS
['asnet', 'classifier', 'fcn_multiscale', 'unet'...]
"""

# Importing a model module registers it.
from skinray.models import asnet, classifier, clnet, fcn, mbdcnn, two_step, unet  # noqa: F401
from skinray.models.backbones import PretrainedWeightsError
from skinray.models.registry import (
    CAM,
    CLASS_LOGITS,
    FEATURES,
    MASK_LOGITS,
    ROI_BOX,
    ModelConfigError,
    ModelSpec,
    create_model,
    get_model_spec,
    list_models,
    register_model,
)
from skinray.models.serialization import (
    SavedModelConfig,
    load_model,
    read_model_config,
    save_model,
)

__all__ = [
    "CAM",
    "CLASS_LOGITS",
    "FEATURES",
    "MASK_LOGITS",
    "ROI_BOX",
    "ModelConfigError",
    "ModelSpec",
    "PretrainedWeightsError",
    "SavedModelConfig",
    "create_model",
    "get_model_spec",
    "list_models",
    "load_model",
    "read_model_config",
    "register_model",
    "save_model",
]
