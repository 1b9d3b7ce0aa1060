"""Make the tiny Hugging Face MoE test checkpoints under tests/data/hf/.

What it makes
-------------
For each of four Hugging Face ``transformers`` MoE architectures

    mixtral    MixtralForCausalLM
    olmoe      OlmoeForCausalLM     (saved as a *sharded* checkpoint)
    qwen2_moe  Qwen2MoeForCausalLM
    qwen3_moe  Qwen3MoeForCausalLM

it builds a tiny float32 model with random weights (fixed seeds, see ``init_weights``), runs one
forward pass with ``attn_implementation="eager"`` and ``experts_implementation="eager"``, and writes
``tests/data/hf/<arch>/``:

    config.json, generation_config.json     model.save_pretrained(..., safe_serialization=True)
    model.safetensors                       (olmoe: model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json   a 128-token BPE trained here with `tokenizers` (same for all four)
    reference.safetensors                   reference tensors (numpy safetensors, readable without torch):
        input_ids                  int32   (2, 16)
        logits                     float32 (2, 16, 128)
        layer{i}.moe_input         float32 (2, 16, hidden)   input of decoder layer i's `mlp` module
                                                             (= post_attention_layernorm output)
        layer{i}.moe_output        float32 (2, 16, hidden)   output of that `mlp` module (before the residual add)
        layer{i}.router_logits     float32 (32, E)           MoE layers only: x @ gate.weight.T (pre-softmax)
        layer{i}.topk_idx          int32   (32, k)           MoE layers only: experts chosen (torch.topk order)
        layer{i}.topk_weight       float32 (32, k)           MoE layers only: their combine weights

tests/data/hf/README.md documents the forward semantics and tensor names a converter must reproduce.

Rerun
-----
    python3.11 -m venv /work/hfvenv
    /work/hfvenv/bin/pip install torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 numpy
    /work/hfvenv/bin/python scripts/make_hf_testdata.py            # writes tests/data/hf/
    /work/hfvenv/bin/python scripts/make_hf_testdata.py --check    # also re-derives everything with numpy only
    python scripts/make_hf_testdata.py --check-only                # numpy only: no torch, transformers, safetensors

The committed files were made with torch 2.13.0+cpu, transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, numpy 2.4.6 on CPU (Python 3.11). Nothing is downloaded: no hub access.

``--check`` runs ``check_numpy``: an independent pure-numpy forward of every saved checkpoint, written
from the README's description (it reads only config.json and the safetensors files), compared to the
reference tensors. It is the proof that the README's semantics and tensor names are right.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "hf")

# jaxmoe's top-level package `kernels/` has the same name as Hugging Face's optional `kernels`
# package, which transformers probes with `import kernels` (is_kernels_available); with the repo root
# on sys.path that import picks up jaxmoe's kernels (and needs jax). Keep the repo root off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

VOCAB = 128
BATCH, SEQ = 2, 16
INPUT_SEED = 7

# Shared tiny dimensions. hidden 32 (not 64) and expert width 24 keep the four checkpoints under
# 1 MB together, and make every matrix non-square (hidden 32, q heads*head_dim 32 or 64, kv 16 or 32,
# expert 24, shared 40, dense 48), so a transposed or mis-split weight fails on shape, not only on values.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# Per-architecture weight seeds, picked from 1234..1253 so that routing has no near-tie,
# see MIN_TOPK_GAP.
ARCHS = {
    # Mixtral: softmax -> top-k -> renormalize (always), no shared expert, untied lm_head.
    "mixtral": dict(
        seed=1248,
        cls="MixtralForCausalLM",
        config_cls="MixtralConfig",
        kwargs=dict(
            intermediate_size=24,  # per-expert width in Mixtral
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
            tie_word_embeddings=False,
            sliding_window=None,
        ),
    ),
    # OLMoE: softmax -> top-k, no renormalization (norm_topk_prob=False, its default), QK-norm over the
    # whole projected q / k width, untied lm_head. Saved sharded.
    "olmoe": dict(
        seed=1248,
        cls="OlmoeForCausalLM",
        config_cls="OlmoeConfig",
        kwargs=dict(
            intermediate_size=24,  # per-expert width in OLMoE
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            tie_word_embeddings=False,
            attention_bias=False,
            clip_qkv=None,
        ),
        max_shard_size="64KB",
    ),
    # Qwen2-MoE: top-4 of 8 without renormalization, sigmoid-gated shared expert, q/k/v biases,
    # layer 0 dense (mlp_only_layers=[0]), tied embeddings.
    "qwen2_moe": dict(
        seed=1253,
        cls="Qwen2MoeForCausalLM",
        config_cls="Qwen2MoeConfig",
        kwargs=dict(
            intermediate_size=48,  # dense-MLP width (layer 0)
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            qkv_bias=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 2000.0},
            tie_word_embeddings=True,
        ),
    ),
    # Qwen3-MoE: top-2 with renormalization, per-head QK-norm, no biases, head_dim (16) decoupled
    # from hidden/heads (8) as in the real Qwen3-MoE checkpoints, untied lm_head.
    "qwen3_moe": dict(
        seed=1248,
        cls="Qwen3MoeForCausalLM",
        config_cls="Qwen3MoeConfig",
        kwargs=dict(
            head_dim=16,
            intermediate_size=48,  # unused: no dense layer
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 750.0},
            tie_word_embeddings=False,
        ),
    ),
}

# Minimum gap, in softmax probability, between the k-th and (k+1)-th expert of every token. A
# reimplementation whose router probabilities differ by float32 rounding must pick the same experts.
MIN_TOPK_GAP = 1e-3


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

_TEXT = """\
a mixture of experts layer sends every token to a few of its experts. a small router reads the
token, scores each expert, and keeps the best ones. the chosen experts run their own feed forward
network on the token, and the layer adds their outputs, each weighted by the router's score.
some models also keep a shared expert that sees every token. its output is scaled by a gate and
added to the routed experts. the router is trained with the rest of the model, and a balance loss
keeps the experts evenly loaded, so that no expert sits idle while another one is overloaded.
attention mixes information between tokens. each head projects the hidden state into queries, keys
and values, rotates queries and keys by their position, and takes a softmax over the scores.
grouped query attention lets several query heads share one key and value head, which saves memory
when the cache of keys and values grows long during generation.
"""

_WORDS = (
    "the a an expert router token layer model weight norm head query key value cache shared gate "
    "softmax score top sum mean small large fast slow first last every each one two four eight "
    "reads writes sends keeps runs adds scales rotates mixes picks trains loads saves checks"
).split()


def training_text() -> list[str]:
    """A few KB of fixed lowercase text: a hand-written paragraph plus seeded word salad."""
    rng = np.random.default_rng(20240601)
    lines = [ln for ln in _TEXT.splitlines() if ln.strip()]
    for _ in range(60):
        n = int(rng.integers(5, 12))
        words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n)]
        lines.append(" ".join(words) + ".")
    return lines


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    assert tok.token_to_id("<unk>") == 0 and tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    return tok


def save_tokenizer(tok, folder: str) -> None:
    """tokenizer.json (the `tokenizers` file) + a minimal tokenizer_config.json.

    The config names the class "PreTrainedTokenizerFast" (transformers 4.x and 5.x both load it;
    transformers 5's own save_pretrained would write "TokenizersBackend", which 4.x lacks).
    """
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": COMMON["max_position_embeddings"],
        "add_bos_token": False,
        "add_eos_token": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def init_weights(model, seed: int) -> None:
    """Overwrite every parameter with a seeded draw that depends only on (seed, parameter name).

    Scales are chosen so activations stay O(1) and routing / norms visibly matter:
      *norm.weight              1 + 0.1 * N(0,1)
      embed_tokens.weight       N(0, 1)
      mlp.gate.weight (router)  N(0, (2/sqrt(hidden))^2): router logits of std ~2, decisive routing
      *.bias                    N(0, 0.3^2)
      any other weight          N(0, 1/fan_in), fan_in = last dim (nn.Linear (out,in); experts (E,out,in))
    Parameters are the in-memory (fused) ones: experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I).
    """
    import torch

    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            z = rng.standard_normal(tuple(p.shape))
            if "norm" in name:
                v = 1.0 + 0.1 * z
            elif "embed_tokens" in name:
                v = z
            elif name.endswith("mlp.gate.weight"):
                v = z * (2.0 / np.sqrt(hidden))
            elif name.endswith(".bias"):
                v = 0.3 * z
            else:
                v = z / np.sqrt(p.shape[-1])
            p.copy_(torch.from_numpy(v.astype(np.float32)))


def build_model(arch: str):
    import torch
    import transformers

    spec = ARCHS[arch]
    config_cls = getattr(transformers, spec["config_cls"])
    config = config_cls(**COMMON, **spec["kwargs"])
    model_cls = getattr(transformers, spec["cls"])
    torch.manual_seed(0)
    model = model_cls._from_config(
        config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    init_weights(model, spec["seed"])
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


def run_reference(model, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Forward once; capture each decoder layer's `mlp` input/output and router outputs by hooks."""
    import torch

    ref: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int32)}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def mlp_hook(mod, args, out, i=i):
            ref[f"layer{i}.moe_input"] = args[0].detach().float().numpy().copy()
            ref[f"layer{i}.moe_output"] = out.detach().float().numpy().copy()

        hooks.append(layer.mlp.register_forward_hook(mlp_hook))
        router = getattr(layer.mlp, "gate", None)
        if router is not None and hasattr(router, "top_k"):

            def gate_hook(mod, args, out, i=i):
                logits, scores, idx = out
                ref[f"layer{i}.router_logits"] = logits.detach().float().numpy().copy()
                ref[f"layer{i}.topk_idx"] = idx.detach().numpy().astype(np.int32)
                ref[f"layer{i}.topk_weight"] = scores.detach().float().numpy().copy()

            hooks.append(router.register_forward_hook(gate_hook))
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),
            use_cache=False,
            output_router_logits=True,
        )
    for h in hooks:
        h.remove()
    ref["logits"] = out.logits.detach().float().numpy().copy()

    # The model's own router_logits output (captured from the router by transformers' OutputRecorder)
    # must equal the hooked ones: one (B*T, E) tensor per MoE layer, in layer order.
    moe_layers = [i for i in range(len(model.model.layers)) if f"layer{i}.router_logits" in ref]
    assert len(out.router_logits) == len(moe_layers)
    for i, rl in zip(moe_layers, out.router_logits):
        np.testing.assert_array_equal(rl.numpy(), ref[f"layer{i}.router_logits"])
    return ref


def topk_gap(ref: dict[str, np.ndarray], k: int) -> float:
    gaps = []
    for key, logits in ref.items():
        if key.endswith("router_logits"):
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            s = -np.sort(-p, axis=-1)
            gaps.append((s[:, k - 1] - s[:, k]).min())
    return float(min(gaps))


def make_arch(arch: str, tok, input_ids: np.ndarray) -> None:
    import torch
    import transformers
    from safetensors.numpy import save_file

    folder = os.path.join(OUT, arch)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)

    model = build_model(arch)
    ref = run_reference(model, input_ids)
    k = model.config.num_experts_per_tok
    gap = topk_gap(ref, k)
    assert gap > MIN_TOPK_GAP, f"{arch}: top-{k} near-tie (gap {gap:.2e}); change a seed"

    save_kwargs = {}
    if "max_shard_size" in ARCHS[arch]:
        save_kwargs["max_shard_size"] = ARCHS[arch]["max_shard_size"]
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    save_tokenizer(tok, folder)
    save_file(
        {k_: np.ascontiguousarray(v) for k_, v in sorted(ref.items())},
        os.path.join(folder, "reference.safetensors"),
        # One key: safetensors writes a multi-key metadata dict in hash order (not reproducible).
        metadata={"made_by": f"scripts/make_hf_testdata.py arch={arch} transformers={transformers.__version__} "
                             f"torch={torch.__version__}"},
    )

    # The numpy-only reader used by check_numpy agrees with the safetensors package.
    from safetensors.numpy import load_file

    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            a, b = load_file(os.path.join(folder, fn)), read_safetensors(os.path.join(folder, fn))
            assert a.keys() == b.keys() and all(np.array_equal(a[k_], b[k_]) for k_ in a), fn

    # Round trip: the saved folder (in the original per-expert checkpoint layout) reloads through
    # transformers' own converter to a model that reproduces the reference logits bit for bit.
    model_cls = getattr(transformers, ARCHS[arch]["cls"])
    re_model = model_cls.from_pretrained(
        folder, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()
    ref2 = run_reference(re_model, input_ids)
    for key in ref:
        np.testing.assert_array_equal(ref[key], ref2[key], err_msg=f"{arch} reload {key}")
    print(f"{arch}: {sum(p.numel() for p in model.parameters())} params, min top-{k} prob gap {gap:.3g}, "
          f"reload bit-exact")


# ---------------------------------------------------------------------------------------------------
# Independent numpy forward (the README's semantics, executed)
# ---------------------------------------------------------------------------------------------------


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a .safetensors file with numpy alone (no `safetensors` package needed).

    Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian data; offsets are
    relative to the end of the header. (BF16 is not handled here: none of these files has it.)
    """
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        arr = np.frombuffer(raw, dtype=dt, count=(e - b) // dt.itemsize, offset=8 + n + b)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def load_folder(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json + all weights of a checkpoint folder, single-file or sharded (index.json)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w: dict[str, np.ndarray] = {}
    for fn in files:
        w.update(read_safetensors(os.path.join(folder, fn)))
    return cfg, w


def np_forward(cfg: dict, w: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Pure-numpy float64 forward of one of the four architectures, from config.json + safetensors."""
    arch = cfg["model_type"]
    H = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"]
    E = cfg.get("num_local_experts") or cfg.get("num_experts")
    k = cfg["num_experts_per_tok"]
    B, T = ids.shape
    def f64(a):
        return a.astype(np.float64)

    def rms(x, g):
        return f64(g) * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def lin(x, name, bias=False):
        y = x @ f64(w[name + ".weight"]).T
        return y + f64(w[name + ".bias"]) if bias else y

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def glu_mlp(x, p):  # down(silu(gate(x)) * up(x))
        return lin(silu(lin(x, p + ".gate_proj")) * lin(x, p + ".up_proj"), p + ".down_proj")

    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))  # (T, hd)
    sin = np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x (B, heads, T, hd); rotate_half convention (halves, not interleaved pairs)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    out: dict[str, np.ndarray] = {}
    x = f64(w["model.embed_tokens.weight"])[ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms(x, w[p + ".input_layernorm.weight"])
        bias = arch == "qwen2_moe"
        q = lin(h, p + ".self_attn.q_proj", bias)
        kk = lin(h, p + ".self_attn.k_proj", bias)
        v = lin(h, p + ".self_attn.v_proj", bias)
        if arch == "olmoe":  # RMSNorm over the full projected width, before the head split
            q = rms(q, w[p + ".self_attn.q_norm.weight"])
            kk = rms(kk, w[p + ".self_attn.k_norm.weight"])
        q = q.reshape(B, T, nh, hd)
        kk = kk.reshape(B, T, nkv, hd)
        v = v.reshape(B, T, nkv, hd)
        if arch == "qwen3_moe":  # RMSNorm over head_dim, per head, before RoPE
            q = rms(q, w[p + ".self_attn.q_norm.weight"])
            kk = rms(kk, w[p + ".self_attn.k_norm.weight"])
        q, kk, v = (a.transpose(0, 2, 1, 3) for a in (q, kk, v))
        q, kk = rope(q), rope(kk)
        rep = nh // nkv  # GQA: query head j uses kv head j // rep
        kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)
        s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
        x = x + lin(a, p + ".self_attn.o_proj")

        h = rms(x, w[p + ".post_attention_layernorm.weight"])
        out[f"layer{i}.moe_input"] = h
        mlp = p + (".block_sparse_moe" if arch == "mixtral" else ".mlp")
        if mlp + ".gate.weight" not in w:  # dense layer (qwen2_moe mlp_only_layers)
            y = glu_mlp(h, mlp)
        else:
            t = h.reshape(B * T, H)
            logits = t @ f64(w[mlp + ".gate.weight"]).T
            out[f"layer{i}.router_logits"] = logits
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            idx = np.argsort(-pr, axis=-1, kind="stable")[:, :k]
            wt = np.take_along_axis(pr, idx, -1)
            if arch == "mixtral" or cfg.get("norm_topk_prob"):
                wt = wt / wt.sum(-1, keepdims=True)
            y = np.zeros_like(t)
            for e in range(E):
                ep = f"{mlp}.experts.{e}"
                names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
                g_, u_, d_ = (f64(w[f"{ep}.{n}.weight"]) for n in names)
                sel = (idx == e)
                rows = sel.any(-1)
                if not rows.any():
                    continue
                ye = (silu(t[rows] @ g_.T) * (t[rows] @ u_.T)) @ d_.T
                y[rows] += ye * (wt * sel).sum(-1)[rows, None]
            if arch == "qwen2_moe":
                gate = 1.0 / (1.0 + np.exp(-(t @ f64(w[mlp + ".shared_expert_gate.weight"]).T)))
                y = y + gate * glu_mlp(t, mlp + ".shared_expert")
            y = y.reshape(B, T, H)
            out[f"layer{i}.topk_idx"] = idx
        out[f"layer{i}.moe_output"] = y
        x = x + y
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    out["logits"] = x @ f64(head).T
    return out


def check_numpy() -> None:
    """Needs numpy only (plus `tokenizers`, if installed, for a decode round trip)."""
    for arch in ARCHS:
        folder = os.path.join(OUT, arch)
        cfg, w = load_folder(folder)
        ref = read_safetensors(os.path.join(folder, "reference.safetensors"))
        got = np_forward(cfg, w, ref["input_ids"])
        worst = 0.0
        for key, val in got.items():
            if key.endswith("topk_idx"):  # same experts; compare as sets (order within top-k is free)
                np.testing.assert_array_equal(np.sort(val, -1), np.sort(ref[key], -1), err_msg=key)
                continue
            r = ref[key].astype(np.float64)
            err = np.abs(val - r).max() / max(1.0, np.abs(r).max())
            worst = max(worst, err)
            assert err < 5e-6, f"{arch} {key}: rel err {err:.2e}"
        missing = set(ref) - set(got) - {"input_ids"} - {k_ for k_ in ref if k_.endswith("topk_weight")}
        assert not missing, missing
        try:  # the tokenizer decodes what it encodes
            from tokenizers import Tokenizer
        except ImportError:
            pass
        else:
            tk = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            s = "the router sends each token to two experts."
            assert tk.decode(tk.encode(s).ids) == s
        print(f"{arch}: numpy forward matches reference (worst rel err {worst:.2e}), {len(w)} tensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="after writing, re-derive with numpy only")
    ap.add_argument("--check-only", action="store_true", help="only run the numpy check")
    args = ap.parse_args()
    if not args.check_only:
        import torch

        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        tok = make_tokenizer()
        tok2 = make_tokenizer()
        assert tok.to_str() == tok2.to_str(), "BPE training is not deterministic"
        input_ids = np.random.default_rng(INPUT_SEED).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
        for arch in ARCHS:
            make_arch(arch, tok, input_ids)
    if args.check or args.check_only:
        check_numpy()


if __name__ == "__main__":
    sys.exit(main())
