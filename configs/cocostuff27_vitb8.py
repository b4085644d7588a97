"""CocoStuff-27, DINO ViT-B/8 (the released cocostuff27_vit_base_5.ckpt setting).

Loss weights/shifts: the "Cocostuff27 10/3 vit_base" block of the official train_config.yml
(src/configs/train_config.yml). That this block is the paper's ViT-B COCO-Stuff setting is our
assumption, not verified against the paper; see docs/official_results.md.
"""

from stego_jax.config import base_config, set_loss


def get_config(arg: str = ""):
    c = base_config()
    c.data.name = "cocostuff27"
    c.data.root = "data/cocostuff27_five"
    c.data.n_classes = 27
    c.model.backbone = "dino_vitb8"
    set_loss(c, pos_intra=(0.1, 0.12), pos_inter=(1.0, 0.2), neg_inter=(0.1538476246415498, 1.0))
    return c
