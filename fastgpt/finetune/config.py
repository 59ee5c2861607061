"""What a fine-tuning run is, as flat dataclasses like pretraining's `TrainConfig`.

The same mechanism (`fastgpt.train.options`) makes them command-line flags, reads them from
TOML/YAML files (`--config`), and, for instruction tuning, merges a checkpoint's saved
options with the ones a resumed invocation gave. No torch import here: `fastgpt --help`
builds its parsers from these classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import FastGPTError

TRAINABLE = ("last-n", "all", "lora")
DEFAULT_LORA_TARGETS = ("qkv", "proj", "fc")  # the attention and MLP matrices of every block
POOLINGS = ("last", "mean")  # what a classifier reads: the last real token, or the mean over real tokens


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _split_field(default: list[float]):
    return field(default_factory=lambda: list(default),
                 metadata={"flag": "split", "nargs": 3, "metavar": ("TRAIN", "VAL", "TEST")})


@dataclass
class FinetuneConfig:
    """The options every fine-tuning task shares."""
    model: str | None = None           # directory, downloaded name, or tiny / mini
    data: str | None = None
    out: str | None = None
    split_fractions: list[float] = _split_field([0.7, 0.1, 0.2])
    seed: int = 123
    max_length: int | None = None
    trainable: str = field(default="all", metadata={"choices": TRAINABLE})
    last_n: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                                    metadata={"parse": comma_list})
    epochs: float = 2.0
    lr: float = 5e-5
    weight_decay: float = 0.1
    batch_size: int = 8
    grad_clip: float = 1.0             # max global gradient norm; 0 disables clipping
    dtype: str = "auto"                # auto, fp32, bf16, fp16 (or float32, bfloat16, float16): autocast
    device: str = "auto"

    POSITIVE = ("epochs", "batch_size", "lora_rank", "max_length")

    def validate(self):
        self.split_fractions = list(self.split_fractions)
        self.lora_targets = list(self.lora_targets)
        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FastGPTError(f"--{name.replace('_', '-')}: must be positive, got {value}")
        if self.trainable not in TRAINABLE:
            raise FastGPTError(f"--trainable: unknown mode {self.trainable!r} (choose from: {', '.join(TRAINABLE)})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClassifyConfig(FinetuneConfig):
    """`fastgpt finetune classify`: a text classifier."""
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = field(default=None, metadata={"parse": comma_list})
    balance: bool = False
    pooling: str = field(default="last", metadata={"choices": POOLINGS})
    trainable: str = field(default="last-n", metadata={"choices": TRAINABLE})
    epochs: int = 5

    REQUIRED = ("model", "data", "out")


@dataclass
class StepwiseConfig(FinetuneConfig):
    """The options of a run trained step by step with checkpoints (`fastgpt.finetune.run`): instruct and dpo;
    saved in every checkpoint for --resume."""
    split_fractions: list[float] = _split_field([0.85, 0.10, 0.05])
    max_steps: int | None = None
    min_lr: float | None = None        # default lr / 10
    warmup_steps: int | None = None    # default 5% of the steps
    eval_interval: int | None = None   # default: twice per epoch
    eval_batches: int | None = None    # default: the whole validation split
    ckpt_interval: int = 0
    keep_last: int = 1
    overwrite: bool = False
    max_new_tokens: int = 256
    test_limit: int | None = None
    generate_responses: bool = field(default=True, metadata={"flag": "responses"})

    POSITIVE = (*FinetuneConfig.POSITIVE, "max_steps", "max_new_tokens", "eval_batches", "test_limit")
    REQUIRED = ("model", "data", "out")
    TASK = ""                 # the subcommand, recorded in checkpoints
    FIXED_ON_RESUME = ()      # options a resumed run may not change (besides what trains)

    def validate(self):
        super().validate()
        if self.keep_last < 0:
            raise FastGPTError(f"--keep-last: must be 0 (keep all) or more, got {self.keep_last}")
        return self


@dataclass
class InstructConfig(StepwiseConfig):
    """`fastgpt finetune instruct`: an instruction follower."""
    template: str = "alpaca"
    mask_prompt: bool = False

    TASK = "instruct"
    FIXED_ON_RESUME = ("template",)


LOGPROB_MODES = ("sum", "mean")


@dataclass
class DPOConfig(StepwiseConfig):
    """`fastgpt finetune dpo`: preference tuning of an instruction model (`fastgpt.finetune.dpo`)."""
    template: str | None = None        # default: the one stored in the model's metadata
    beta: float = 0.1
    logprob: str = field(default="sum", metadata={"choices": LOGPROB_MODES})
    lr: float = 5e-6
    epochs: float = 1.0

    POSITIVE = (*StepwiseConfig.POSITIVE, "beta")
    TASK = "dpo"
    FIXED_ON_RESUME = ("template", "logprob")
