"""k-means weight sharing: every targeted Linear keeps only k distinct values (a per-layer codebook).

Each weight matrix is clustered in 1-D with scikit-learn's KMeans, fitted on a random subsample (plus
the layer's largest weights) for speed, then refined by one Lloyd step over all the layer's values.
The folder stores, per layer, the codebook (k floats) and one ceil(log2 k)-bit index per weight, plus
the untouched tensors (embeddings, norms): its size is the real compressed size. Loading rebuilds dense
float weights as codebook[indices], so the matmuls run in float32 (honesty "simulated": smaller on disk,
not faster or smaller in memory).

    variants: [{name: km16, method: kmeans, options: {k: 16}}]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from workbench.methods.base import (BuildContext, BuildSpeed, Method, MethodOptions, SizeEstimate, SizeInput,
                                    write_custom_loader)
from workbench.methods.weights import (INCLUDE_LM_HEAD, TARGETS, Targets, load_float_model, load_tensors,
                                       model_from_config, plain_state, save_config, save_tensors, save_tokenizer,
                                       target_linears, write_report)

if TYPE_CHECKING:
    from workbench.planning.modelshape import ModelShape

WEIGHTS_FILE = "kmeans.safetensors"


class KMeansOptions(MethodOptions):
    k: int = Field(
        64, description="Clusters (distinct values) per layer, 2 to 256; each weight is stored as a ceil(log2 k)-bit "
        "index.",
    )
    seed: int = Field(0, description="Seed for the subsample and the k-means++ initialisation (reproducible).")
    sample_size: int = Field(
        16384, gt=0, description="k-means is fitted on at most this many random values per layer (then all are "
        "assigned).",
    )
    outliers: int = Field(
        256, ge=0,
        description="The largest-|w| values of each layer always join the fit sample, so outlier weights get clusters "
        "of their own instead of being clipped to the nearest bulk value (the model depends on them).",
    )
    codebook_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the stored codebook values (k per layer)."
    )
    targets: Targets = TARGETS
    include_lm_head: bool = INCLUDE_LM_HEAD

    @field_validator("k")
    @classmethod
    def _k_range(cls, value: int) -> int:
        if value < 2:
            raise ValueError(
                f"k must be at least 2 (got {value}): one cluster would replace a whole layer by one value"
            )
        if value > 256:
            raise ValueError(f"k must be at most 256 (got {value}): cluster indices are stored in at most 8 bits")
        return value

    @model_validator(mode="after")
    def _sample_holds_k(self) -> "KMeansOptions":
        if self.sample_size < self.k:
            raise ValueError(f"sample_size ({self.sample_size}) must be at least k ({self.k})")
        return self


def index_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def pack(indices: Any, bits: int) -> Any:
    """uint8 indices < 2**bits -> a flat uint8 tensor holding `bits` bits per index (big-endian bit order)."""
    import numpy as np
    import torch

    flat = indices.flatten().numpy()
    if bits == 8:
        return torch.from_numpy(flat.copy())
    planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]  # the low `bits` bits of each index
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack(packed: Any, bits: int, count: int) -> Any:
    """The inverse of `pack`: `count` uint8 indices.

    Vectorised per group of lcm(bits, 8) bits (whole bytes holding whole indices, e.g. 3 bytes = 4 six-bit
    indices): 5-10x faster than np.unpackbits, which matters because a load unpacks every clustered weight.
    """
    import math

    import numpy as np
    import torch

    if bits == 8:
        return packed[:count]
    group_bits = bits * 8 // math.gcd(bits, 8)
    per_group, group_bytes = group_bits // bits, group_bits // 8
    data = packed.numpy()
    groups = -(-len(data) // group_bytes)
    data = np.concatenate([data, np.zeros(groups * group_bytes - len(data), np.uint8)]).reshape(groups, group_bytes)
    word = np.zeros(groups, np.uint64)
    for column in range(group_bytes):  # big-endian, as np.packbits wrote them
        word = (word << np.uint64(8)) | data[:, column].astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.stack([(word >> np.uint64(bits * (per_group - 1 - i))) & mask for i in range(per_group)], axis=1)
    return torch.from_numpy(out.reshape(-1)[:count].astype(np.uint8))


def _assign(values: Any, centers: Any) -> Any:
    """Index of the nearest of the sorted `centers` for every value (1-D: compare with the midpoints)."""
    import torch

    return torch.bucketize(values, (centers[1:] + centers[:-1]) / 2)


def cluster(weight: Any, options: KMeansOptions, dtype: Any) -> tuple[Any, Any]:
    """(codebook [<=k] in `dtype`, uint8 indices shaped like `weight`) for one weight matrix."""
    import numpy as np
    import torch
    from sklearn.cluster import KMeans as SkKMeans

    values = weight.detach().float().flatten()
    array = values.numpy()
    rng = np.random.default_rng(options.seed)
    sample = array if array.size <= options.sample_size else \
        array[rng.choice(array.size, options.sample_size, replace=False)]
    if 0 < options.outliers < array.size:
        # A random sample rarely holds the few largest weights; without them k-means clips them (measured on
        # SmolLM2-135M, k=16: perplexity 26000 without, 42 with the 256 largest in the sample).
        sample = np.concatenate([sample, array[np.argpartition(np.abs(array), -options.outliers)[-options.outliers:]]])
    clusters = min(options.k, len(np.unique(sample)))  # a layer with few distinct values (e.g. pruned) needs fewer
    fit = SkKMeans(n_clusters=clusters, n_init=1, random_state=options.seed)
    fit.fit(sample.reshape(-1, 1).astype(np.float64))
    # Round to the stored dtype before assigning, so each weight maps to its nearest *stored* value.
    centers = torch.from_numpy(np.sort(fit.cluster_centers_.ravel())).to(dtype).float()
    # One Lloyd step over every value: the subsample's centres moved to the mean of all weights they hold.
    index = _assign(values, centers)
    counts = torch.bincount(index, minlength=len(centers))
    sums = torch.zeros(len(centers)).scatter_add_(0, index, values)
    centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers).sort().values.to(dtype).float()
    index = _assign(values, centers)
    return centers.to(dtype), index.to(torch.uint8).view(weight.shape)


class KMeans(Method):
    name = "kmeans"
    summary = "k-means weight sharing: k values per layer, stored as codebook + log2(k)-bit indices; runs dequantized."
    Options = KMeansOptions
    honesty = "simulated"
    accepts = frozenset({"hf"})
    produces = "custom"

    def estimate_size(self, options: MethodOptions, size: SizeInput) -> SizeEstimate:
        """The loader rebuilds dense float32 weights from codebook[indices], so memory holds float32."""
        size.notes.append("codebook + packed ceil(log2 k)-bit indices on disk; rebuilt as dense float32 when loaded")
        return SizeEstimate(size.dense_bytes("float32"), "kmeans (float32 when loaded)", "float32")

    def estimate_build_s(self, options: MethodOptions, shape: "ModelShape", speed: BuildSpeed) -> float:
        """Linear in k, as Lloyd's assignment step is (a rough constant, not fitted on measured builds)."""
        assert isinstance(options, KMeansOptions)
        return speed.io_s() + shape.linear_params() * 10 * options.k * 2e-10

    def build(self, input_dir: Path, out_dir: Path, options: MethodOptions, ctx: BuildContext) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        assert isinstance(options, KMeansOptions)
        model = load_float_model(input_dir, ctx)
        layers = target_linears(model, options.targets, options.include_lm_head)
        dtype = getattr(torch, options.codebook_dtype)
        tensors = plain_state(model, input_dir)
        rows, bits = [], index_bits(options.k)
        ctx.emit(f"clustering {len(layers)} Linear layers into {options.k} values each")
        with threadpool_limits(ctx.threads), torch.no_grad():  # sklearn's OpenMP pool honours the pinned threads
            for number, (name, module) in enumerate(layers, 1):
                codebook, indices = cluster(module.weight, options, dtype)
                restored = codebook.float()[indices.long()]
                error = float((restored - module.weight).norm() / module.weight.norm().clamp(min=1e-12))
                del tensors[f"{name}.weight"]
                tensors[f"{name}.weight.codebook"] = codebook
                tensors[f"{name}.weight.indices"] = pack(indices, bits)
                rows.append({"name": name, "clusters": len(codebook), "relative_error": error})
                if number % 20 == 0:
                    ctx.emit(f"clustered {number}/{len(layers)} layers")
        save_tensors(tensors, out_dir / WEIGHTS_FILE)
        save_config(model, out_dir)
        save_tokenizer(input_dir, out_dir, ctx)
        clustered = [row["name"] for row in rows]
        write_custom_loader(out_dir, "workbench.methods.kmeans:load_model", weights=WEIGHTS_FILE, clustered=clustered,
                            index_bits=bits)
        shared = sum(m.weight.numel() for _, m in layers)
        write_report(out_dir, {
            "k": options.k, "index_bits": bits, "codebook_dtype": options.codebook_dtype,
            "clustered_layers": len(rows),
            "clustered_weights": shared, "bits_per_clustered_weight":
                (bits * shared + sum(r["clusters"] for r in rows) * dtype.itemsize * 8) / shared,
            "mean_relative_error": sum(r["relative_error"] for r in rows) / len(rows), "layers": rows,
        })


def load_model(folder: Path, device: str, trust_remote_code: bool) -> Any:
    """The model with every clustered weight rebuilt densely as codebook[indices] (float32)."""
    import json

    import torch
    from safetensors import safe_open

    from workbench.methods.base import LOADER_FILE

    details = json.loads((Path(folder) / LOADER_FILE).read_text())
    model = model_from_config(folder, trust_remote_code)
    clustered = {f"{name}.weight" for name in details["clustered"]}
    with safe_open(str(Path(folder) / details["weights"]), "pt") as stored:
        plain = [key for key in stored.keys() if not key.endswith((".weight.codebook", ".weight.indices"))]

        def tensor(key: str) -> Any:  # one layer at a time, so loading never holds two copies of the model
            if key not in clustered:
                return stored.get_tensor(key)
            shape = model.get_parameter(key).shape
            indices = unpack(stored.get_tensor(f"{key}.indices"), details["index_bits"], shape.numel())
            codebook = stored.get_tensor(f"{key}.codebook").float().numpy()
            return torch.from_numpy(codebook[indices.numpy()]).view(shape)  # numpy gathers by uint8 directly

        load_tensors(model, plain + sorted(clustered), tensor, folder)
    return model.to(device).eval()
