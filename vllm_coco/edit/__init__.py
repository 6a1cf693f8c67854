"""Edit: LE-COCO / ablation / LoRA checkpoints (bake), the NE-COCO gate and its export."""
