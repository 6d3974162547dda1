"""A parallel layout as the planner sees it (:class:`Layout`), and the training-stage facts the
planner needs: which parameter groups each stage trains and its largest image's patches.

A layout is what one GPU job would be launched with (TP, PP, VPP, EP, expert-TP, DP, stage 0's
LLM layers, recompute, dtype) plus what one micro-batch holds (one packed sequence of
``seq_length`` tokens carrying ``patches`` vision patches). :meth:`Layout.validate` refuses,
with the flag's name, every layout the model builder would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_navil.config.model import RECOMPUTE_MODES, NaViLConfig, Recompute

GiB = 1024**3
RECOMPUTE = RECOMPUTE_MODES
DTYPES = ("bf16", "fp32")
# Parameter groups of training/recipes.py (which stage trains what).
GROUPS = ("vision", "connector", "special_tokens", "visual_experts", "text_attention", "rest")
STAGE_TRAINS = {
    "s1.1": ("vision", "connector", "special_tokens", "visual_experts"),
    "s1.2": ("vision", "connector", "special_tokens", "visual_experts", "text_attention"),
    "s2": GROUPS,
}
STAGE_MAX_PATCHES = {"s1.1": 4096, "s1.2": 12188, "s2": 24576}


def vision_tp(cfg: NaViLConfig, tp: int) -> int:
    """TP of the vision tower: ``tp`` where its heads and MLP divide, else 1 (replicated).
    The same rule as ``models.vision.tp_size_for``, kept torch-free here (tested equal)."""
    v = cfg.vision
    return tp if v.heads % tp == 0 and v.mlp % tp == 0 else 1


@dataclass(frozen=True)
class Layout:
    """A parallel layout and what one micro-batch holds."""

    tp: int = 1  # tensor parallel (sequence parallel on when > 1)
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual stages (model chunks) per pipeline rank; > 1: interleaved 1F1B
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel (None: = tp)
    dp: int = 1  # data parallel
    first_stage_layers: int | None = None  # LLM layers of stage 0 (None: even split)
    seq_length: int = 16384  # tokens of one packed sequence = one micro-batch
    patches: int = 16384  # vision patches of one micro-batch (the packer's patch budget)
    max_image_patches: int = 24576  # largest image (base scale), for the attention FLOPs
    recompute: str = "none"  # LLM layers: none | selective | full
    vision_recompute: str | None = None  # vision blocks (None: as ``recompute``)
    dtype: str = "bf16"  # bf16 (fp32 master + grads) | fp32 (CPU runs: plain fp32 Adam)
    stage: str = "s2"  # training stage: frozen parameters get no grads / optimizer state
    micro_batches: int | None = None  # per DP replica per step (None: 16)

    @property
    def vision_rc(self) -> str:
        return self.vision_recompute or self.recompute

    def recompute_config(self) -> Recompute:
        """The model's ``Recompute`` for this layout (``build_model(recompute=...)``)."""
        return Recompute(llm=self.recompute, vision=self.vision_rc).validate()

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.dp // (self.ep * self.expert_tp)

    @property
    def stages(self) -> int:
        return self.pp * self.vpp

    def name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.etp is not None and self.etp != self.tp:
            parts.append(f"ETP{self.etp}")
        parts.append(f"DP{self.dp}")
        if self.first_stage_layers is not None:
            parts.append(f"first{self.first_stage_layers}")
        return " ".join(parts)

    def validate(self, cfg: NaViLConfig) -> Layout:
        """ValueError (one line, naming the flag) when the layout cannot build ``cfg``."""
        lm, e = cfg.language, cfg.experts
        for name in ("tp", "pp", "vpp", "ep", "dp", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.patches < 0:
            raise ValueError(f"--patches must be >= 0, got {self.patches}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"--recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.vision_rc not in RECOMPUTE:
            raise ValueError(
                f"--recompute-vision must be one of {RECOMPUTE}, got {self.vision_recompute!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.stage not in STAGE_TRAINS:
            raise ValueError(f"--stage must be one of {tuple(STAGE_TRAINS)}, got {self.stage!r}")
        if self.vpp > 1 and self.pp < 2:
            raise ValueError(f"--vpp {self.vpp} needs --pp >= 2 (got --pp {self.pp})")
        for name, count in (("heads", lm.heads), ("kv_heads", lm.kv_heads)):
            if count % self.tp:
                raise ValueError(f"--tp {self.tp} does not divide the LLM's {count} {name}")
        if lm.vocab % self.tp:
            raise ValueError(f"--tp {self.tp} does not divide the vocabulary of {lm.vocab}")
        if self.tp > 1 and self.seq_length % self.tp:
            raise ValueError(
                f"--seq-length {self.seq_length} is not a multiple of --tp {self.tp} "
                "(sequence parallelism)"
            )
        if vision_tp(cfg, self.tp) > 1 and lm.hidden % self.tp:
            raise ValueError(f"--tp {self.tp} does not divide the LLM hidden size {lm.hidden}")
        experts = 2 * e.per_modality
        if experts % self.ep:
            raise ValueError(f"--ep {self.ep} does not divide the {experts} experts")
        if lm.ffn % self.expert_tp:
            raise ValueError(f"--etp {self.expert_tp} does not divide the FFN size {lm.ffn}")
        if (self.tp * self.dp) % (self.ep * self.expert_tp):
            raise ValueError(
                f"ep*etp={self.ep * self.expert_tp} must divide tp*dp={self.tp * self.dp} "
                "(megatron-core's expert groups)"
            )
        from megatron_navil.models.build import stage_layer_ranges

        try:
            ranges = stage_layer_ranges(lm.layers, self.stages, self.first_stage_layers)
        except ValueError as exc:
            flag = "--pp * --vpp" if self.vpp > 1 else "--pp"
            raise ValueError(f"{flag}: {exc} (--first-stage-layers)") from None
        if self.stages > 1 and any(len(r) == 0 for r in ranges[1:]):
            raise ValueError(
                f"{self.stages} pipeline stages leave a stage after the first without LLM layers"
            )
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"--micro-batches must be >= 1, got {self.micro_batches}")
        return self


def micro_batches(layout: Layout) -> int:
    """Micro-batches per DP replica per step (default 16)."""
    return 16 if layout.micro_batches is None else layout.micro_batches


def default_patches(stage: str, seq_length: int, merge: int = 2) -> int:
    """The stage's largest image with its multi-scale copies (about twice its base patches),
    capped at a sequence made only of image tokens."""
    return min(2 * STAGE_MAX_PATCHES[stage], merge * merge * seq_length)
