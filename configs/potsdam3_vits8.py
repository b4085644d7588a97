"""Potsdam-3, DINO ViT-S/8 (the released potsdam_test.ckpt setting).

Checkpoint hparams (issue #39): vit_small, no crop, batch 16, 5000 steps, res 224. Loss
weights/shifts: the "Potsdam vit small 1/31/22" block of the official train_config.yml (the
block active in the repository's first commit).
"""

from ml_collections import config_dict

from stego_jax.config import base_config, set_loss


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "potsdam3"
    c.data.root = "data/potsdam"
    c.data.crop_type = config_dict.placeholder(str)  # None, overridable: --config.data.crop_type=five
    c.data.n_classes = 3
    c.model.backbone = "dino_vits8_300ep"
    set_loss(c, pos_intra=(0.67, 0.08), pos_inter=(0.25, 0.02), neg_inter=(0.63, 0.46))
    return c
