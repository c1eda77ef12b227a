"""The model zoo: T2T-ViT and the paper's ViT baselines, registered into timm.

Importing this package registers every model, after which ``timm.create_model("t2t_vit_14")`` and
``timm.list_models("t2t_vit*")`` work; registration is the only side effect. The published numbers
the models are checked against live in :data:`PAPER`.
"""

from pipeline.models import t2t_vit, vit
from pipeline.models.cost import count_macs, count_params
from pipeline.models.paper import PAPER, PaperEntry

__all__ = ["PAPER", "PaperEntry", "count_macs", "count_params", "t2t_vit", "vit"]
