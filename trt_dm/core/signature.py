"""The UNet's input signature: built once from the model, read by every stage.

Runners check feeds against it, export takes its example inputs, input names and dynamic axes from it, the
engine builder sizes its optimization profiles by its named axes, and tests and the profiler draw feeds
from it. Names follow the diffusers forward: ``sample``, ``timestep``, then the conditioning inputs
``encoder_hidden_states`` (text/cross-attention), for SDXL-layout UNets ``text_embeds`` (pooled text embedding) and
``time_ids`` (the six micro-conditioning numbers, float), and ``class_labels``. The output is ``out_sample``.

Conventions (one for every runner and graph): float inputs are float32 at the interface (a runner computing
in fp16 casts inside), the timestep is int64 (the samplers pass true training timesteps; the UNet's
sinusoidal projection computes in fp32) except for flow-matching models, whose time input is float32 (sigma x 1000,
``trt_dm.core.flow``), class labels are int64 indices. Dynamic axes are named:
"batch" (every input, dim 0), "sequence" (encoder_hidden_states, dim 1), "height"/"width" when the model
has no fixed sample_size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

OUTPUT_NAME = "out_sample"
SDXL_TIME_IDS = 6  # SDXL's added conditioning: original (h, w), crop (top, left), target (h, w)
DEFAULT_SEQ_LEN = 77  # CLIP's; the profile's opt sequence length and example feeds
# The interface dtypes, each with its name in trt_dm's JSON (signatures, sidecars), ONNX Runtime's type string and
# OpenVINO's element type: the one table every reader of a graph's or file's inputs maps through (``dtypes``).
_DTYPE_NAMES = {torch.float32: ("float32", "tensor(float)", "f32"), torch.int64: ("int64", "tensor(int64)", "i64"),
                torch.float16: ("float16", "tensor(float16)", "f16"), torch.int32: ("int32", "tensor(int32)", "i32")}
DTYPE_SPELLINGS = ("json", "onnxruntime", "openvino")


def dtypes(spelling: str) -> dict[str, torch.dtype]:
    """{name: torch dtype} of the interface dtypes as ``spelling`` (one of ``DTYPE_SPELLINGS``) writes them."""
    i = DTYPE_SPELLINGS.index(spelling)
    return {names[i]: dtype for dtype, names in _DTYPE_NAMES.items()}


_DTYPES = dtypes("json")
Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    """One input: its name, interface dtype, shape (ints fixed, strings name dynamic axes), whether it is
    conditioning, and for integer labels the number of valid values (labels are 0 .. num_values - 1)."""
    name: str
    dtype: torch.dtype
    shape: tuple[Dim, ...]
    conditioning: bool = False
    num_values: int | None = None

    @property
    def dims(self) -> tuple[int, ...]:
        """The shape with -1 for every dynamic axis."""
        return tuple(d if isinstance(d, int) else -1 for d in self.shape)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(not isinstance(e, int) or e == s for e, s in zip(self.shape, shape))

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."),
                             "shape": list(self.shape), "conditioning": self.conditioning}
        if self.num_values is not None:
            d["num_values"] = self.num_values
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        if d["dtype"] not in _DTYPES:
            raise ValueError(f"input {d['name']!r}: dtype {d['dtype']!r} is not one of {sorted(_DTYPES)}")
        return cls(d["name"], _DTYPES[d["dtype"]], tuple(d["shape"]), bool(d.get("conditioning", False)),
                   d.get("num_values"))


@dataclass(frozen=True)
class Signature:
    """The inputs of one UNet, in forward-argument order."""
    inputs: tuple[TensorSpec, ...]

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def conditioning(self) -> list[str]:
        return [i.name for i in self.inputs if i.conditioning]

    def __getitem__(self, name: str) -> TensorSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(f"no input {name!r}; inputs: {self.names}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def sample_shape(self) -> tuple[Dim, ...]:
        """(C, H, W) of one image."""
        return self["sample"].shape[1:]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes, the output included."""
        axes = {i.name: {a: d for a, d in enumerate(i.shape) if isinstance(d, str)} for i in self.inputs}
        axes[OUTPUT_NAME] = dict(axes["sample"])
        return axes

    def check(self, feed: Mapping[str, torch.Tensor], who: str = "UNet") -> None:
        """Raise ValueError naming what is wrong when ``feed`` does not fit: names, ranks, fixed sizes, one batch."""
        missing = [n for n in self.names if n not in feed]
        extra = [k for k in feed if k not in self.names]
        if missing or extra:
            raise ValueError(f"{who}: inputs {sorted(feed)} do not match the model's {sorted(self.names)} "
                             f"(missing {missing}, unexpected {extra})")
        batch = None
        for spec in self.inputs:
            shape = tuple(feed[spec.name].shape)
            if not spec.accepts(shape):
                raise ValueError(f"{who}: input {spec.name!r} has shape {shape}, expected {spec.dims} (-1 = any)")
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise ValueError(f"{who}: input {spec.name!r} has batch {shape[0]}, 'sample' has {batch}")

    def example(self, batch: int, *, seed: int = 0, seq_len: int = DEFAULT_SEQ_LEN, height: int = 32,
                timestep: int | None = None, num_train_timesteps: int = 1000) -> dict[str, torch.Tensor]:
        """A seeded feed of ``batch`` rows: normal floats, timesteps (random, or all ``timestep``), valid labels."""
        g = torch.Generator().manual_seed(seed)
        sizes = {"batch": batch, "sequence": seq_len, "height": height, "width": height}
        feed = {}
        for spec in self.inputs:
            shape = tuple(d if isinstance(d, int) else sizes[d] for d in spec.shape)
            if spec.name == "timestep":  # int64, or a flow model's float32 time input
                feed[spec.name] = (torch.full(shape, timestep, dtype=torch.int64) if timestep is not None
                                   else torch.randint(0, num_train_timesteps, shape, generator=g)).to(spec.dtype)
            elif spec.name == "encoder_attention_mask":  # every token kept
                feed[spec.name] = torch.ones(shape, dtype=spec.dtype)
            elif not spec.dtype.is_floating_point:
                feed[spec.name] = torch.randint(0, spec.num_values or 2, shape, generator=g).to(spec.dtype)
            else:
                feed[spec.name] = torch.randn(shape, generator=g).to(spec.dtype)
        return feed

    def to_dict(self) -> dict:
        return {"inputs": [i.to_dict() for i in self.inputs], "output": OUTPUT_NAME}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Signature:
        return cls(tuple(TensorSpec.from_dict(i) for i in d["inputs"]))

    @classmethod
    def from_unet(cls, unet) -> Signature:
        """From a loaded denoiser (its class, or ``trt_dm_kind`` of the transformer subclasses) or a fake-quant copy."""
        return cls.from_config(getattr(unet, "trt_dm_kind", type(unet).__name__), dict(unet.config))

    @classmethod
    def from_config(cls, kind: str, c: Mapping[str, Any]) -> Signature:
        """From the class name and config.json of a UNet or DiT (see the module docstring for the conventions)."""
        size = c.get("sample_size")
        hw: tuple[Dim, ...] = (("height", "width") if size is None else (size, size) if isinstance(size, int)
                               else tuple(size))
        flux = kind == "FluxTransformer2DModel"  # its in_channels count the 2x2-packed latent
        channels = c["in_channels"] // 4 if flux else c["in_channels"]
        specs = [TensorSpec("sample", torch.float32, ("batch", channels, *hw)),
                 TensorSpec("timestep", torch.int64, ("batch",))]
        if flux:  # rectified flow: float time input; T5 tokens, CLIP-L's pooled output; Flux.1-dev: embedded guidance
            specs[1] = TensorSpec("timestep", torch.float32, ("batch",))
            specs += [TensorSpec("encoder_hidden_states", torch.float32,
                                 ("batch", "sequence", int(c.get("joint_attention_dim", 4096))), True),
                      TensorSpec("text_embeds", torch.float32, ("batch", int(c.get("pooled_projection_dim", 768))),
                                 True)]
            if c.get("guidance_embeds"):
                specs.append(TensorSpec("guidance", torch.float32, ("batch",), True))
            return cls(tuple(specs))
        if kind == "SD3Transformer2DModel":  # rectified flow: the time input is a float (sigma x 1000)
            specs[1] = TensorSpec("timestep", torch.float32, ("batch",))
            return cls((*specs, TensorSpec("encoder_hidden_states", torch.float32,
                                           ("batch", "sequence", int(c.get("joint_attention_dim", 4096))), True),
                        TensorSpec("text_embeds", torch.float32, ("batch", int(c.get("pooled_projection_dim", 2048))),
                                   True)))
        if kind == "PixArtTransformer2DModel":  # T5 tokens and their padding mask (1 = token, 0 = padding)
            return cls((*specs, TensorSpec("encoder_hidden_states", torch.float32,
                                           ("batch", "sequence", int(c["caption_channels"])), True),
                        TensorSpec("encoder_attention_mask", torch.float32, ("batch", "sequence"), True)))
        if kind == "DiTTransformer2DModel":  # adaLN class labels; the table's last row is the null label
            n = int(c["num_embeds_ada_norm"]) + 1
            return cls((*specs, TensorSpec("class_labels", torch.int64, ("batch",), True, n)))
        if kind == "UNet2DConditionModel":
            dim = c["cross_attention_dim"]
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            specs.append(TensorSpec("encoder_hidden_states", torch.float32, ("batch", "sequence", dim), True))
            if c.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 micro-conditioning ids
                pooled = c["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * c["addition_time_embed_dim"]
                specs += [TensorSpec("text_embeds", torch.float32, ("batch", pooled), True),
                          TensorSpec("time_ids", torch.float32, ("batch", SDXL_TIME_IDS), True)]
        cet = c.get("class_embed_type")
        if cet == "timestep":  # labels go through the sinusoidal time projection: any integer
            specs.append(TensorSpec("class_labels", torch.int64, ("batch",), True, c.get("num_train_timesteps") or 1000))
        elif cet == "projection":
            specs.append(TensorSpec("class_labels", torch.float32,
                                    ("batch", c["projection_class_embeddings_input_dim"]), True))
        elif c.get("num_class_embeds") is not None:
            specs.append(TensorSpec("class_labels", torch.int64, ("batch",), True, int(c["num_class_embeds"])))
        return cls(tuple(specs))

    @classmethod
    def from_onnx(cls, model_or_path) -> Signature:
        """From an exported graph's inputs (names, element types, dims / dim_params)."""
        import onnx
        model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path),
                                                                                         load_external_data=False)
        types = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
                 onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT32: torch.int32}
        specs = []
        for i in model.graph.input:
            t = i.type.tensor_type
            if t.elem_type not in types:
                raise ValueError(f"graph input {i.name!r} has ONNX element type {t.elem_type}, not float/int")
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "dynamic") for d in t.shape.dim)
            specs.append(TensorSpec(i.name, types[t.elem_type], shape, i.name not in ("sample", "timestep")))
        return cls(tuple(specs))
