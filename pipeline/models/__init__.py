"""The model zoo: T2T-ViT, the paper's ViT baselines and its "From CNN to ViT" variants, in timm.

Importing this package registers every model, after which ``timm.create_model("t2t_vit_14")`` and
``timm.list_models("t2t_vit*")`` work; registration is the only side effect. The published numbers
the models are checked against live in :data:`PAPER`.
"""

from pipeline.models import cnn_to_vit, dvt, t2t_vit, vit
from pipeline.models.cost import count_macs, count_params
from pipeline.models.paper import PAPER, PaperEntry

__all__ = ["PAPER", "PaperEntry", "cnn_to_vit", "count_macs", "count_params", "dvt", "t2t_vit", "vit"]
