"""The recipe schema: one dataclass per section, a docstring under every field (the README's
recipe reference is generated from them), and the value lists other modules share. Loading,
overrides and value checks are `vrwkv_core.config`'s; import the classes from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

RWKV_VERSIONS = ("x070", "x060")  # the LM families (vrwkv_core.model.families.FAMILIES)
WKV_BACKENDS = ("auto", "reference", "chunked", "cuda", "fla")  # vrwkv_core.kernels.BACKENDS
CLIP_GRID = 24  # the clip tower's patch grid side (336 / 14)
CLIP_GRID_SIZES = (-1, 0, 1) + tuple(g for g in range(2, CLIP_GRID + 1) if CLIP_GRID % g == 0)


def clip_tokens(grid_size: int) -> int:
    """Image rows per image of the clip tower for `model.vision.grid_size` (v6.0's grid_pooling):
    576 patches + CLS (-1), CLS (0), the patches' mean + CLS (1), g x g pooled patches + CLS (g)."""
    if grid_size == -1:
        return CLIP_GRID * CLIP_GRID + 1
    return 1 if grid_size == 0 else grid_size * grid_size + 1


@dataclass
class RWKVSection:
    """The RWKV language model."""

    checkpoint: Optional[str] = None
    """RWKV World .pth to start from (a path or `hub:NAME`); null builds a random model."""
    version: str = "x070"
    """Architecture: `x070` (RWKV-7) or `x060` (RWKV-6)."""
    n_layer: int = 12
    """Number of blocks."""
    n_embd: int = 768
    """Model width C."""
    head_size: int = 64
    """Size N of each WKV head (C / N heads)."""
    vocab_size: int = 65536
    """Vocabulary size (the World tokenizer has 65536 ids)."""
    dim_ffn: Optional[int] = None
    """Channel-mix width; null means 4 * n_embd (x070) or int(3.5*C // 32 * 32) (x060)."""
    wkv_backend: str = "auto"
    """WKV kernel: auto (the CUDA kernel on a GPU when it builds, else chunked), chunked, cuda, or
    reference (the slow sequential loop, for checks). `--wkv-backend` on chat/eval/bench sets it too."""


@dataclass
class TinyTowerSection:
    """The `tiny` vision tower: a small randomly initialised timm ViT for tests and CPU."""

    width: int = 64
    """Embedding width."""
    depth: int = 2
    """Number of transformer blocks."""
    heads: int = 2
    """Attention heads."""
    patch_size: int = 8
    """Patch size in pixels."""
    stem: str = "patch"
    """Patch embedding: `patch` (one strided conv, plain ViT) or `conv` (3x3 stride-2 convs
    with GroupNorm, one per halving; classifies shape kinds much sooner when trained directly)."""


@dataclass
class TowerFilesSection:
    """Tower weight files (a path or `hub:NAME`), used when building from an RWKV World .pth."""

    dino: Optional[str] = None
    """DINOv2-L/14 reg4 weights (timm safetensors)."""
    siglip: Optional[str] = None
    """SigLIP SO400M/14 weights (timm safetensors or the open_clip file)."""
    sam: Optional[str] = None
    """SAM ViT-B image encoder weights (timm safetensors or Meta's .pth)."""
    clip: Optional[str] = None
    """CLIP ViT-L/14-336 weights (v6.0)."""


@dataclass
class VisionSection:
    """The vision towers."""

    towers: list[str] = field(default_factory=lambda: ["dino", "siglip", "sam"])
    """Towers in concatenation order: dino, siglip, sam (v7.00), clip (v6.0), or tiny."""
    image_size: int = 448
    """Square input size of the DINOv2/SigLIP/tiny towers (SAM always takes 1024)."""
    freeze: bool = True
    """Keep towers frozen (no grads, eval mode). Set false to train them."""
    tiling: bool = False
    """Split images larger than 896x896 into the original's least-waste grid of 448 tiles plus the global view."""
    grid_size: int = -1
    """The clip tower (v6.0) only: -1 = 576 patches + CLS (577 rows, the released models), 0 = CLS only,
    1 = the patches' mean + CLS, g = g x g average-pooled patches + CLS (g divides 24);
    `model.tokens_per_image` must equal the row count."""
    checkpoints: TowerFilesSection = field(default_factory=TowerFilesSection)
    """Tower weight files, used when building a new model from an RWKV World .pth."""
    tiny: TinyTowerSection = field(default_factory=TinyTowerSection)
    """Shape of the `tiny` tower."""


@dataclass
class ProjectorSection:
    """The projector from tower features to the LM width."""

    type: str = "mlp"
    """`mlp` (gated: LayerNorm(o_proj(x * sigmoid(gate(x))))) or `linear`."""


@dataclass
class ModelSection:
    """The whole VisualRWKV model."""

    rwkv: RWKVSection = field(default_factory=RWKVSection)
    """The language model."""
    vision: VisionSection = field(default_factory=VisionSection)
    """The vision towers."""
    projector: ProjectorSection = field(default_factory=ProjectorSection)
    """The projector."""
    tokens_per_image: int = 1024
    """Image tokens per image after adaptive pooling (a square number)."""
    image_position: str = "first"
    """Where the image goes in the human turn: `first` (v7.00), `middle` (v6.0 finetune: every human turn, then the image, then its own text) or `last` (`text\\n<image>`)."""


@dataclass
class DataSection:
    """Training data (LLaVA-style JSONL written by `vrwkv prepare-data`)."""

    root: str = "data/shapes"
    """Folder the other data paths are relative to."""
    pretrain_file: str = "pretrain.jsonl"
    """Stage-1 records."""
    finetune_file: str = "finetune.jsonl"
    """Stage-2 records."""
    image_folder: str = "images"
    """Folder image paths in the records are relative to (kept inside it)."""
    ctx_len: int = 2048
    """Longest training sample in tokens; longer ones are truncated keeping whole images."""
    val_fraction: float = 0.02
    """Held-out fraction of the records for validation loss."""
    order: str = "shuffle"
    """Sample order: `shuffle` (seeded permutation per epoch) or `original` (the original's k^3 mod p visiting order; use val_fraction 0)."""
    truncation: str = "whole_images"
    """Cutting samples longer than ctx_len: `whole_images` (keep the head, never cut inside an image) or `original` (v7.00: the first ctx_len tokens; v6.0: the last ctx_len when the first hold no label)."""
    skip_bad_images: bool = False
    """Drop samples whose image fails to load (counted and logged) instead of stopping."""
    num_workers: int = 0
    """DataLoader worker processes."""
    synthetic: bool = False
    """Prepare the synthetic shapes data in `root` when it is missing."""


PEFT_METHODS = ("lora", "miss", "state")  # vrwkv_core.checkpoint.adapters
PEFT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
# The default: the time mix's four matrices and the channel mix's down-projection. All six put
# r=64 at 5.56% of the 0.1B LM (12 x 64 x (4 x 1536 + 2 x 3840)); these five at 4.01%, under
# the 5% a small-GPU user expects of LoRA. Name all six in `targets` to adapt ffn.key as well.
DEFAULT_PEFT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.value")


@dataclass
class PeftSection:
    """Parameter-efficient finetuning of the LM (LoRA / PiSSA / MiSS through `peft`, or RWKV state tuning)."""

    method: Optional[str] = None
    """null (train the LM fully, as `trainable` says), lora, miss, or state (a learned initial WKV state)."""
    r: int = 64
    """Adapter rank (lora, miss)."""
    alpha: float = 128.0
    """LoRA scale numerator: the update is alpha / r * B A (lora)."""
    dropout: float = 0.0
    """Dropout on the adapter input (lora, miss)."""
    init: str = "default"
    """default, or pissa (lora only: A, B start as the weight's principal singular vectors)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_PEFT_TARGETS))
    """LM layers that get adapters, from att.receptance, att.key, att.value, att.output, ffn.key, ffn.value (default: all but ffn.key)."""
    state_lr: float = 1.0
    """Learning rate of the initial state (state; RWKV-PEFT uses about 1.0), on the stage's schedule."""


@dataclass
class StageSection:
    """One training stage (pretrain or finetune)."""

    out_dir: str = "out/model/stage"
    """Where config.yaml, model.safetensors, last.ckpt, metrics.csv, loss.png go."""
    init_from: Optional[str] = None
    """A previous stage's out_dir (or a released .pth) to start from."""
    trainable: list[str] = field(default_factory=lambda: ["projector"])
    """Parts that train: projector, rwkv, rwkv.emb, rwkv.head, vision."""
    frozen: list[str] = field(default_factory=list)
    """Parts kept frozen inside trainable ones (released finetune: [rwkv.emb])."""
    lr_init: float = 1e-3
    """Peak learning rate after warmup."""
    lr_final: float = 1e-5
    """Learning rate at the end of the cosine schedule."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps."""
    max_steps: int = 1000
    """Optimizer steps in this stage."""
    micro_batch: int = 1
    """Samples per device per forward; lower it if you run out of memory."""
    grad_accum: int = 1
    """Micro batches per optimizer step (derived when global_batch is set)."""
    global_batch: Optional[int] = None
    """Samples per optimizer step; when set, grad_accum = global_batch / (micro_batch x devices x nodes), which must divide."""
    devices: Optional[int] = None
    """Devices per node for this stage; null uses hardware.devices."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    l2wrap: float = 0.0
    """The original's L2Wrap: backward adds max_logit * l2wrap / (B*T) at the argmax logit of every position (1.0e-4 in the released recipes; 0 disables)."""
    loss_mean: str = "labelled_samples"
    """Batch mean of the per-sample losses: over `labelled_samples`, or over `all_samples` (the original: samples without labels count as 0)."""
    frozen_layers: int = 0
    """The original's freeze_rwkv N: blocks below N stay frozen (N = n_layer freezes the whole LM); 0 freezes none."""
    save_every_steps: int = 500
    """Write last.ckpt every this many steps (and at the end)."""
    val_every_steps: int = 500
    """Validation loss every this many steps (0 disables)."""
    seed: int = 42
    """Seed for init, data order and dropout."""
    image_position: Optional[str] = None
    """Image placement in this stage's training samples; null uses model.image_position (v6.0 stage 1: `first`)."""
    max_bad_steps: int = 10
    """Stop after this many steps in a row with a non-finite loss or gradients (each is skipped, not applied)."""
    shared_prefix: int = 0
    """Run each image prefix ("User: <image>") once per batch and go on from a copy of its state for every record that shares it, the rests of the records in a few length buckets; N > 1 also batches the records about one image in runs of up to N (one question per record: all of an image's questions, say). Same loss, less work. 0: the plain forward (always with l2wrap, the original's truncation or v6.0's image layout)."""
    tower_steps: int = 0
    """Before the stage, train the vision tower alone this many steps on the records' region labels ("regions": [{box, phrase}]); for towers trained from scratch (the tiny recipe); 0: none. A resumed stage skips it."""
    tower_lr: float = 1.0e-3
    """AdamW learning rate of that tower pretraining (constant)."""
    peft: PeftSection = field(default_factory=PeftSection)
    """Adapters or state tuning instead of training the LM's weights (see README, "Finetune with LoRA")."""


@dataclass
class HardwareSection:
    """Where and how to run."""

    accelerator: str = "auto"
    """auto, cpu or gpu."""
    devices: int = 1
    """Devices per node."""
    nodes: int = 1
    """Number of nodes."""
    precision: str = "bf16"
    """bf16 or fp32."""
    strategy: str = "auto"
    """auto, ddp, deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_3."""
    cpu_offload: bool = False
    """DeepSpeed: offload optimizer states to CPU."""
    grad_checkpoint: bool = False
    """Recompute block activations in backward to save memory."""
    ds_bucket_mb: int = 200
    """DeepSpeed reduce/allgather bucket size in MB."""
    deterministic: bool = False
    """Deterministic algorithms for bit-exact reruns and resumes on GPU (slower); CPU runs are deterministic already."""


@dataclass
class LoggingSection:
    """Training logs."""

    csv: bool = True
    """metrics.csv in out_dir."""
    tensorboard: bool = False
    """TensorBoard logs in out_dir/tb."""
    wandb: Optional[str] = None
    """W&B project name (null disables)."""


@dataclass
class Recipe:
    """A whole recipe: the model, the data, both stages and the hardware."""

    name: str = "model"
    """Name used in output folders and model ids."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: DataSection = field(default_factory=DataSection)
    """The data."""
    pretrain: StageSection = field(default_factory=StageSection)
    """Stage 1: projector only (released setup)."""
    finetune: StageSection = field(
        default_factory=lambda: StageSection(
            trainable=["projector", "rwkv"], frozen=["rwkv.emb"], lr_init=6e-5, lr_final=1.5e-5
        )
    )
    """Stage 2: projector and LM (released setup)."""
    hardware: HardwareSection = field(default_factory=HardwareSection)
    """Hardware."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Logging."""
