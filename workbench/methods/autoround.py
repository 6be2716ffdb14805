"""AutoRound (Intel): sign-gradient descent on how each weight is rounded, exported to GGUF or to its own checkpoint.

AutoRound 0.15.1 (`auto_round.AutoRound`, auto_round/autoround.py) quantizes a model block by block. With
`iters > 0` (SignRound, auto_round/algorithms/quantization/sign_round/quantizer.py `quantize_block`) it learns a
rounding offset in [-0.5, 0.5] per weight and, by default, the clipping range of each group, by signed gradient
descent on the block's output error over calibration sequences (`iters` steps, learning rate 1/iters unless `lr`
is given), and keeps the best iterate: when no step lowers the error the result is round-to-nearest. `iters: 0`
is round-to-nearest (RTNConfig with disable_opt_rtn) or, with `optimized_rtn`, AutoRound's importance-weighted
RTN, which needs calibration data too. Calibration sequences come from workbench/data/calibration.py (never the
evaluation text) and are handed to AutoRound as token tensors, so its default hub dataset is never fetched. The
tuning runs on the CPU (device_map "cpu") with the build's threads, whatever device the variant runs on.

`autoround`: a GGUF file, written by AutoRound's own exporter (`quantize_and_save(format="gguf:q4_k_m")`,
auto_round/export/export_to_gguf/export.py `save_quantized_as_gguf`): the llama.cpp converter AutoRound bundles
(auto_round/export/export_to_gguf/conversion/; it downloads a newer one only when AUTO_ROUND_GGUF_AUTO_UPDATE=1)
packs the tuned integers into llama.cpp's own block formats (Q4_0 ... Q6_K), so llama.cpp's kernels run the file
like any other GGUF. Each tensor's type follows llama.cpp's mix rules (its GGUFDTypeSelector ports
src/llama-quant.cpp); where a row is not a multiple of a K-quant's 256-value block AutoRound falls back to Q5_0
(Q8_0 for Q6_K), not always llama.cpp's choice. The converter must know the model's BPE pre-tokenizer (by hash);
that is checked before any tuning, as tuning can take hours and the export comes last.

`autoround-native`: AutoRound's own checkpoint (`format="auto_round"`: GPTQ-packed int32 weights, float16 scales
and zero points, safetensors), which transformers loads back through AutoRound's quantizer. Measured with 0.15.1
on this CPU: the only CPU backend is `auto_round:torch_zp` (auto_round/inference/backend.py), which unpacks each
weight on every call and converts the whole model to float16 (convert_model.py: "Forced model to
torch.float16"); it takes symmetric weights only: an asymmetric checkpoint asks for `auto-round-lib`, which is not
installed, and AutoRound's loader then ends the process (`exit(-1)` in backend.py). So `sym` is not an option, and
the speed label is measured (`honesty_from_speed`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, get_args

from pydantic import Field, field_validator, model_validator

from workbench.data.calibration import CalibrationSpec, calibration_sequences, describe
from workbench.data.gguf_info import GGUF_NAME
from workbench.errors import WorkbenchError
from workbench.methods.base import (
    DTYPE_BYTES, BuildContext, BuildSpeed, Method, MethodOptions, ShapeCheck, SizeEstimate, SizeInput,
)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

# The GGUF file types AutoRound 0.15.1 exports (auto_round/export/formats/backends/gguf.py,
# `GGUFFormat.support_schemes`), less its own GGUF:Q2_K_MIXED recipe (MoE only with iters > 0, otherwise
# rewritten to Q2_K_S), whose mix the size estimate does not model. tests/test_autoround.py checks this list
# against the installed package.
GGUFType = Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
                   "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)
EXPORT_DIR = "autoround-export"  # AutoRound writes into a subfolder of its own naming; the files are moved out
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
BATCH = 8  # AutoRound's default batch size (samples per tuning step), capped by the number of samples
_LOSS = re.compile(r"loss iter 0: ([-+0-9.eE]+|nan|inf) -> iter (\d+): ([-+0-9.eE]+|nan|inf)")


class _AutoRoundOptions(MethodOptions):
    """What both exports share: the algorithm and its calibration."""

    iters: int = Field(50, ge=0, description="Sign-gradient steps per block (50: AutoRound's light recipe; its default, "
                                             "200, is sized for a GPU); 0: round-to-nearest, no tuning.")
    lr: float | None = Field(None, gt=0, description="Learning rate of the rounding offsets (iters > 0); None: "
                                                     "AutoRound's default, 1/iters (its light recipe sets 0.005).")
    optimized_rtn: bool = Field(False, description="With iters 0: AutoRound's importance-weighted round-to-nearest "
                                                   "(uses the calibration data; AutoRound skips it for 8-bit types) "
                                                   "instead of plain round-to-nearest.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec,
                                         description="Calibration sequences (samples, seq_len, text, seed; never the "
                                                     "eval text), used when iters > 0 or optimized_rtn.")

    @model_validator(mode="after")
    def _options_of_the_chosen_algorithm(self) -> "_AutoRoundOptions":
        if self.iters == 0 and self.lr is not None:
            raise ValueError("lr sets the step of the sign-gradient descent: it needs iters > 0 "
                             "(iters 0 is round-to-nearest)")
        if self.iters > 0 and self.optimized_rtn:
            raise ValueError("optimized_rtn is a round-to-nearest variant: it needs iters 0 "
                             "(iters > 0 tunes the rounding)")
        return self

    def uses_calibration(self) -> bool:
        return self.iters > 0 or self.optimized_rtn


class AutoRoundGGUFOptions(_AutoRoundOptions):
    format: Literal["gguf"] = Field("gguf", description="gguf: a GGUF file that llama.cpp runs. AutoRound's own "
                                                        "checkpoint, run by torch, is the method autoround-native.")
    gguf_type: GGUFType = Field("Q4_K_M", description="llama.cpp file type AutoRound exports: Q4_0, Q4_1, Q5_0, Q5_1, "
                                                      "Q8_0, Q2_K_S, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K (any case).")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU when device is cuda (-1: all).")

    @field_validator("format", mode="before")
    @classmethod
    def _native_is_its_own_method(cls, value: Any) -> Any:
        if value == "native":
            raise ValueError("format native is the method autoround-native (AutoRound's own safetensors checkpoint, "
                             "run by torch through transformers); autoround writes GGUF for llama.cpp")
        return value

    @field_validator("gguf_type", mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name = value.upper().removeprefix("GGUF:")
        if name not in GGUF_TYPES:
            raise ValueError(f"AutoRound exports the GGUF types {', '.join(GGUF_TYPES)}, not '{value}' (IQ types, "
                             "Q2_K and float files: use the gguf method)")
        return name


class AutoRoundNativeOptions(_AutoRoundOptions):
    bits: Literal[2, 3, 4, 8] = Field(4, description="Weight bits (symmetric integers, W{bits}A16).")
    group_size: int = Field(128, gt=0, description="Columns sharing one scale; must divide every decoder Linear's "
                                                   "input width (SmolLM2's 576 takes 32 or 64, not 128).")

    @model_validator(mode="before")
    @classmethod
    def _symmetric_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sym", True) is True:
            return {k: v for k, v in data.items() if k != "sym"}  # sym: true says what is always done
        if isinstance(data, dict):
            raise ValueError("only sym: true: AutoRound 0.15.1 loads asymmetric checkpoints on a CPU only with "
                             "auto-round-lib, which is not installed (its loader then ends the process)")
        return data


def require_auto_round() -> Any:
    try:
        import auto_round
    except Exception as exc:  # an ImportError, or a dependency that fails as it loads
        raise WorkbenchError(f"auto-round is unavailable ({type(exc).__name__}: {exc}); install it with "
                             "'pip install auto-round==0.15.1' to run autoround variants") from None
    return auto_round


class _BlockLosses(logging.Handler):
    """AutoRound logs each tuned block as "quantized 7/7 layers in the block, loss iter 0: A -> iter B: C" (only
    there): kept for the report, which then shows whether tuning lowered the loss or kept the round-to-nearest start
    (best iter 0), and passed on as progress."""

    def __init__(self, progress: Any) -> None:
        super().__init__(level=logging.DEBUG)
        self.progress = progress
        self.blocks: list[dict[str, float | int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _LOSS.search(record.getMessage())
        if match:
            first, best_iter, best = float(match[1]), int(match[2]), float(match[3])
            self.blocks.append({"loss_iter_0": first, "best_iter": best_iter, "best_loss": best})
            self.progress(f"autoround: block {len(self.blocks)} tuned, loss {first:.3g} -> {best:.3g} (iter {best_iter})")


def check_gguf_export(input_dir: Path) -> str:
    """The architecture, once AutoRound's bundled llama.cpp converter is known to write this model's file.

    Raises before any tuning when it cannot: an architecture it lacks, or a BPE pre-tokenizer it does not recognise
    (the converter knows tokenizers by a hash of their output and raises only when it writes the vocabulary, which
    comes after the quantization). Builds the converter's model writer as `create_model_class` does
    (auto_round/export/export_to_gguf/export.py) and asks it for the vocabulary alone."""
    import tempfile

    import gguf
    from auto_round.export.export_to_gguf.config import ModelType
    from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion

    config = json.loads((input_dir / "config.json").read_text())
    names = ", ".join(config.get("architectures") or [config.get("model_type", "?")])
    try:
        conversion = get_conversion(input_dir, model_type=ModelType.TEXT, auto_update=False)
        mistral = "mistral" in str(config.get("model_type")) and (input_dir / "params.json").is_file()
        hparams = conversion.ModelBase.load_hparams(input_dir, mistral)
        architecture = conversion.get_model_architecture(hparams, conversion.model_type(ModelType.TEXT))
        model_class = conversion.get_model_class(architecture, model_type=ModelType.TEXT)
    except NotImplementedError:
        raise WorkbenchError(f"AutoRound's bundled llama.cpp converter does not support {names}: no GGUF file can be "
                             "written (autoround-native writes AutoRound's own checkpoint instead)") from None
    with tempfile.TemporaryDirectory() as scratch:
        writer = model_class(dir_model=input_dir, ftype=gguf.LlamaFileType.MOSTLY_F16, fname_out=Path(scratch),
                             is_big_endian=False, model_name="vocabulary-check", split_max_tensors=False,
                             split_max_size=0, dry_run=True, small_first_shard=False, hparams=hparams)
        try:
            writer.set_vocab()
        except NotImplementedError as exc:
            if "pre-tokenizer" in str(exc):
                raise WorkbenchError(
                    "the llama.cpp converter bundled with AutoRound does not recognise this model's BPE "
                    "pre-tokenizer (it knows tokenizers by a hash of their output), so no GGUF file can be written; "
                    "autoround-native writes AutoRound's own checkpoint instead") from None
            raise WorkbenchError(f"AutoRound's GGUF converter cannot write this model's vocabulary: {exc}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise WorkbenchError(f"AutoRound's GGUF converter cannot read this model's tokenizer "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return str(architecture)


def _quantize(input_dir: Path, export_dir: Path, scheme: str, export_format: str, options: _AutoRoundOptions,
              ctx: BuildContext, scheme_fields: dict[str, Any],
              check: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Load the float model, run AutoRound on the CPU and export into `export_dir`; what was done, for the report.

    A model object (not a path) is passed, so AutoRound never takes its model-free route, which would read and
    download weights by itself. The algorithm is chosen by config object, as AutoRound recommends: SignRoundConfig
    for iters > 0, RTNConfig otherwise (`disable_opt_rtn` unless optimized_rtn). `scheme_fields` (bits, group_size,
    sym) override the scheme's; GGUF schemes fix their own. `check(model)` may refuse the loaded model before the
    calibration and tuning start."""
    import torch
    from auto_round import AutoRound as AutoRoundEntry
    from auto_round import RTNConfig, SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(ctx.threads)
    tokenizer = AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code)
    spec = options.calibration
    sequences = calibration_sequences(tokenizer, spec) if options.uses_calibration() else []  # fails fast on a short text
    if options.iters > 0:
        config: Any = SignRoundConfig(iters=options.iters, lr=options.lr, **scheme_fields)
    else:
        config = RTNConfig(disable_opt_rtn=not options.optimized_rtn, **scheme_fields)
    data: dict[str, Any] = {}
    if sequences:
        data = {"dataset": [torch.tensor([s]) for s in sequences], "nsamples": len(sequences),
                "seqlen": spec.seq_len, "batch_size": min(BATCH, len(sequences))}
    model = AutoModelForCausalLM.from_pretrained(input_dir, dtype=torch.float32, trust_remote_code=ctx.trust_remote_code)
    if check is not None:
        check(model)
    what = "round-to-nearest" if options.iters == 0 else f"{options.iters} sign-gradient steps per block"
    data_note = f" on {len(sequences)} x {spec.seq_len} tokens of {spec.text}" if sequences else ""
    ctx.emit(f"autoround: {scheme}, {what}{data_note}")
    losses = _BlockLosses(ctx.emit)
    log = logging.getLogger("autoround")  # auto_round/logger.py
    log.addHandler(losses)
    started = time.perf_counter()
    try:
        compressor = AutoRoundEntry(model, tokenizer=tokenizer, scheme=scheme, alg_configs=config, device_map="cpu",
                                    seed=spec.seed, trust_remote_code=ctx.trust_remote_code, **data)
        compressor.quantize_and_save(str(export_dir), format=export_format)
    except (ValueError, NotImplementedError) as exc:  # AutoRound's own checks (schemes, shapes) say what is wrong
        raise WorkbenchError(f"AutoRound refused: {str(exc).splitlines()[0][:300]}") from None
    finally:
        log.removeHandler(losses)
    algorithm = type(compressor.quantize_config).__name__  # RTNConfig, OptimizedRTNConfig or SignRoundConfig
    used_data = bool(getattr(compressor.quantize_config, "need_calib", bool(sequences))) and bool(sequences)
    return {
        "algorithm": {"RTNConfig": "round-to-nearest", "OptimizedRTNConfig": "optimized round-to-nearest",
                      "SignRoundConfig": "SignRound"}.get(algorithm, algorithm),
        "config": algorithm, "iters": options.iters,
        "lr": getattr(compressor.quantize_config, "lr", None) if options.iters else None,  # as AutoRound resolved it
        "batch_size": data.get("batch_size"), "device": "cpu", "threads": ctx.threads,
        "block_losses": losses.blocks, "quantize_s": time.perf_counter() - started,
        "calibration": describe(spec) if used_data else None,
    }


def _version() -> str:
    import auto_round

    return str(auto_round.__version__)


def refuse_pickles(folder: Path) -> None:
    """The workbench stores safetensors and GGUF only: a pickle from any exporter is an error, not an artifact."""
    found = sorted(p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise WorkbenchError(f"AutoRound wrote pickle files ({', '.join(found[:3])}); the workbench stores only "
                             "safetensors and GGUF")


# Build-time constants, measured on SmolLM2-135M with this machine's 2 cores shared with another job (so upper
# figures): round-to-nearest with the GGUF export took 221 s (AutoRound quantizes and packs K-quants in torch, block by
# block: 1.6 us per weight, 50x llama.cpp's quantizer); with the native export 90 s (0.7 us per weight); and each
# sign-gradient step about 2.2 s per block on 8 x 128 tokens, ten times a plain forward of that batch at the
# speed build estimates assume (the backward pass, and every weight quantized and dequantized again per step).
GGUF_RTN_S_PER_WEIGHT = 1.6e-6
NATIVE_RTN_S_PER_WEIGHT = 0.7e-6
STEP_FORWARDS = 10


def _tuning_s(options: _AutoRoundOptions, shape: "ModelShape", speed: BuildSpeed, rtn_s_per_weight: float) -> float:
    """Round-to-nearest and export: a pass over the weights. With calibration also the float model's forward over
    every sample (block inputs and outputs are cached), then per step one batch through each block."""
    rtn = shape.params() * rtn_s_per_weight
    if not options.uses_calibration():
        return rtn
    spec = options.calibration
    cached = 2 * speed.forward_s(spec.samples * spec.seq_len, shape.params())
    steps = options.iters * STEP_FORWARDS * speed.forward_s(min(BATCH, spec.samples) * spec.seq_len,
                                                             shape.linear_params())
    return rtn + cached + steps


class AutoRound(Method):
    name = "autoround"
    summary = ("AutoRound (Intel): sign-gradient tuning of each weight's rounding (iters 0: round-to-nearest), "
               "exported to GGUF (Q4_0 ... Q6_K, K-quant mixes); runs on llama.cpp.")
    Options: ClassVar[type[MethodOptions]] = AutoRoundGGUFOptions
    honesty = "real-kernel"  # llama.cpp's own block formats and kernels
    runtime = "llamacpp"
    produces = "gguf"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        assert isinstance(options, AutoRoundGGUFOptions)
        require_auto_round()
        from auto_round.export.formats.backends.gguf import GGUFFormat
        from auto_round.schemes import GGUF_PRESET_ALIASES, GGUF_SCHEME_FACTS

        from workbench.methods.gguf import _finish

        scheme = f"GGUF:{options.gguf_type}"
        if scheme not in GGUFFormat.support_schemes:
            raise WorkbenchError(f"the installed auto-round {_version()} does not export {options.gguf_type} "
                                 f"(it exports {', '.join(s.split(':')[1] for s in GGUFFormat.support_schemes)})")
        ctx.emit("autoround: checking that its llama.cpp converter can write this model")
        architecture = check_gguf_export(input_dir)
        export_dir = out_dir / EXPORT_DIR
        done = _quantize(input_dir, export_dir, scheme, f"gguf:{options.gguf_type.lower()}", options, ctx, {})
        files = sorted(export_dir.rglob("*.gguf"))
        if len(files) != 1:
            raise WorkbenchError(f"AutoRound's GGUF export wrote {len(files)} .gguf files, not one: "
                                 f"{', '.join(f.name for f in files) or 'none'}")
        files[0].replace(out_dir / GGUF_NAME)
        shutil.rmtree(export_dir)
        calibration = done.pop("calibration")
        facts = GGUF_SCHEME_FACTS[GGUF_PRESET_ALIASES[scheme.lower()]]  # the base type's integer format
        report = {
            "requested": options.gguf_type, "format": "gguf", "architecture": architecture,
            "autoround": {"version": _version(), "scheme": scheme, "bits": facts["bits"],
                          "group_size": facts["group_size"], "sym": facts["sym"], "data_type": facts["data_type"],
                          **done},
            "calibration": calibration or "none: round-to-nearest uses no data",
        }
        _finish(out_dir, input_dir, ctx, options.n_gpu_layers, report)

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """llama.cpp's tensor-type mix for this file type (workbench/planning/gguf_plan.py, as the gguf method
        uses): AutoRound writes the same block formats and picks the types by the same rules."""
        from workbench.planning.gguf_plan import predict, token_embd_bytes

        assert isinstance(options, AutoRoundGGUFOptions)
        mix = predict(size.shape, options.gguf_type)
        size.notes.extend(mix["notes"])
        size.notes.append("AutoRound writes llama.cpp's own block formats and picks each tensor's type by llama.cpp's "
                          "mix rules, so llama.cpp's mix is assumed")
        if mix["fallbacks"]:
            size.notes.append("AutoRound's fallback for rows that do not fill a K-quant block is Q5_0 (Q8_0 for Q6_K), "
                              "where llama.cpp picks Q4_0 / Q5_0 / Q5_1: the real mix is in the stage report")
        return SizeEstimate(mix["tensor_bytes"], f"autoround gguf {options.gguf_type}", "gguf",
                            token_embd_bytes(size.shape, options.gguf_type))

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        """Imports (auto-round and its converter: about 10 s), load, tuning, and the GGUF export's packing."""
        assert isinstance(options, AutoRoundGGUFOptions)
        return 10.0 + speed.io_s() + _tuning_s(options, shape, speed, GGUF_RTN_S_PER_WEIGHT)


def _decoder_widths(shape: "ModelShape") -> dict[str, int]:
    """Input width of every Linear AutoRound quantizes in its native format (the decoder blocks; not the head)."""
    return {name: n_in for name, _gguf, _layer, n_in, _out in shape.linears()}


class AutoRoundNative(Method):
    name = "autoround-native"
    summary = ("AutoRound (Intel): sign-gradient tuning of each weight's rounding, saved as AutoRound's own "
               "checkpoint (GPTQ-packed, safetensors); runs in torch through transformers.")
    Options: ClassVar[type[MethodOptions]] = AutoRoundNativeOptions
    honesty = "real-kernel"
    honesty_from_speed = True  # torch_zp unpacks every weight per call on a CPU: the label is measured
    runtime = "torch"
    produces = "quantized"

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        from transformers import AutoTokenizer

        from workbench.methods.llmcompressor import check_group_size, linear_input_widths

        assert isinstance(options, AutoRoundNativeOptions)
        require_auto_round()
        export_dir = out_dir / EXPORT_DIR
        done = _quantize(input_dir, export_dir, f"W{options.bits}A16", "auto_round", options, ctx,
                         {"bits": options.bits, "group_size": options.group_size, "sym": True},
                         check=lambda model: check_group_size(linear_input_widths(model, ["lm_head"]),
                                                              options.group_size))
        folders = sorted({p.parent for p in export_dir.rglob("config.json")})
        if len(folders) != 1:
            raise WorkbenchError(f"AutoRound's export wrote {len(folders)} model folders, not one")
        for item in folders[0].iterdir():
            item.replace(out_dir / item.name)
        shutil.rmtree(export_dir)
        refuse_pickles(out_dir)
        AutoTokenizer.from_pretrained(input_dir, trust_remote_code=ctx.trust_remote_code).save_pretrained(out_dir)
        quantization = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
        calibration = done.pop("calibration")
        (out_dir / "stage_report.json").write_text(json.dumps({
            "format": "native", "autoround": {
                "version": _version(), "scheme": f"W{options.bits}A16", "bits": options.bits,
                "group_size": options.group_size, "sym": True,
                "packing_format": quantization.get("packing_format"), **done},
            "calibration": calibration or "none: round-to-nearest uses no data",
            "cpu_backend": "auto_round:torch_zp (unpacks each weight per call; the model runs in float16)",
        }))

    def reshape(self, shape: "ModelShape", rest: str, options: MethodOptions) -> tuple["ModelShape", str]:
        return shape, "float16"  # AutoRound's CPU backend converts the loaded model to float16

    def refusals(self, options: MethodOptions, check: ShapeCheck) -> list[str]:
        """A group size that does not divide a decoder Linear's input width (read from the config)."""
        from workbench.methods.llmcompressor import check_group_size

        assert isinstance(options, AutoRoundNativeOptions)
        try:
            check_group_size(_decoder_widths(check.shape), options.group_size)
        except WorkbenchError as exc:
            return [f"{check.model}: {exc}"]
        return []

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """What AutoRound's QuantLinear holds on a CPU: per Linear the packed int32 weights (in * bits / 32 rows),
        a float16 scale and a packed zero point per group and output; everything else in float16."""
        assert isinstance(options, AutoRoundNativeOptions)
        shape, bits, group = size.shape, options.bits, options.group_size
        total = (shape.params() - shape.linear_params()) * DTYPE_BYTES["float16"]
        for *_, n_in, n_out in shape.linears():
            groups = math.ceil(n_in / group)
            packed, scales = math.ceil(n_in * bits / 32) * n_out * 4, groups * n_out * 2
            total += packed + scales + groups * math.ceil(n_out * bits / 32) * 4  # int32 qweight, fp16, int32 qzeros
        size.notes.append(f"{bits}-bit packed weights stay packed in memory (AutoRound's torch_zp backend unpacks them "
                          "per call); the rest is float16, as that backend converts the model")
        return SizeEstimate(total, f"autoround int{bits} g{group} (+float16 rest)", f"autoround-int{bits}")

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        assert isinstance(options, AutoRoundNativeOptions)
        return 10.0 + speed.io_s() + _tuning_s(options, shape, speed, NATIVE_RTN_S_PER_WEIGHT)
