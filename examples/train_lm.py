"""Train a small byte-level decoder-only language model built from ejnsa's NSA layer.

Two tasks, both without any download:

  --task text    next-byte prediction on the source code of Python's own standard library
                 (the *.py files next to os.py, read from disk in sorted order; the last 5%
                 of the bytes are held out for the validation loss).
  --task recall  multi-query associative recall: key-value pairs early in a long sequence,
                 the same keys queried at its end, loss only on the answers. The pairs lie
                 farther back than the sliding window, so only the compressed and selected
                 branches can reach them; `--ablation window` trains the same model with a
                 window-only layer as the control (`no-selection` and `no-compression` drop
                 one branch each).

The model is pre-norm: embedding -> L x [x + NSA(RMSNorm(x)); x + MLP(RMSNorm(x))] ->
RMSNorm -> linear head to 256 bytes. AdamW (optax) with warmup + cosine decay, one
`nnx.jit` train step. Every run writes <out>/<run>_loss.png and <out>/<run>_summary.json
(no checkpoint) and prints the summary as one JSON line last.

Examples (from the repository root):

  python examples/train_lm.py                                   # CPU default, ~2-3 min
  python examples/train_lm.py --task recall                     # NSA on recall
  python examples/train_lm.py --task recall --ablation window   # window-only control
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

try:
    import ejnsa
except ModuleNotFoundError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ejnsa
from ejnsa.nnx import NativeSparseAttention

VOCAB = 256  # bytes

# ---------------------------------------------------------------------------------------
# Model


class MLP(nnx.Module):
    """GELU MLP, hidden -> 4 * hidden -> hidden."""

    def __init__(self, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.up = nnx.Linear(hidden, 4 * hidden, use_bias=False, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * hidden, hidden, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    def __init__(self, args: argparse.Namespace, *, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(args.hidden, dtype=dtype, rngs=rngs)
        self.attn = NativeSparseAttention(
            args.hidden,
            args.heads,
            args.kv_heads,
            block_size=args.block_size,
            block_counts=args.block_counts,
            window_size=args.window,
            # The ablations are the very same layer with branches switched off.
            use_selection=args.ablation not in ("window", "no-selection"),
            use_compression=args.ablation not in ("window", "no-compression"),
            platform=None if args.platform == "auto" else args.platform,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm2 = nnx.RMSNorm(args.hidden, dtype=dtype, rngs=rngs)
        self.mlp = MLP(args.hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x, decode=False, num_new=None):
        x = x + self.attn(self.norm1(x), decode=decode, num_new=num_new)
        return x + self.mlp(self.norm2(x))


class LM(nnx.Module):
    def __init__(self, args: argparse.Namespace, *, rngs: nnx.Rngs):
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        self.embed = nnx.Embed(VOCAB, args.hidden, dtype=dtype, rngs=rngs)
        # nnx.List (Flax >= 0.12) marks a list of submodules; older Flax takes a plain list.
        self.blocks = getattr(nnx, "List", list)([Block(args, dtype=dtype, rngs=rngs) for _ in range(args.layers)])
        self.norm = nnx.RMSNorm(args.hidden, dtype=dtype, rngs=rngs)
        # A zero head makes the first loss exactly ln(256) = 5.545 (uniform prediction)
        # instead of a random-init surplus, so "initial loss" means the same in every run.
        self.head = nnx.Linear(args.hidden, VOCAB, use_bias=False, dtype=dtype,
                               kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, tokens, decode=False, num_new=None):
        """Logits [B, T, 256]. decode=True: tokens are new tokens per row, run against each
        layer's KV cache (`init_cache`); num_new [B] marks a row's real ones (the rest pad)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, decode=decode, num_new=num_new)
        return self.head(self.norm(x)).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_length: int):
        """An empty KV cache in every layer, in the computation dtype."""
        for block in self.blocks:
            block.attn.init_cache((batch_size, max_length, block.attn.hidden_size), self.embed.dtype)


# ---------------------------------------------------------------------------------------
# Data


def stdlib_bytes(max_bytes: int) -> np.ndarray:
    """The concatenated source of the stdlib's top-level *.py files, as uint8."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"found no *.py files next to os.py in {root}")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


class TextTask:
    """Random windows of seq_len + 1 bytes; loss on every next byte."""

    def __init__(self, args: argparse.Namespace):
        data = stdlib_bytes(args.text_bytes)
        split = int(len(data) * 0.95)
        self.train, self.valid = data[:split], data[split:]
        self.seq_len = args.seq_len
        self.description = (
            f"{len(data):,} bytes of Python {sys.version_info.major}.{sys.version_info.minor} stdlib "
            f"source ({len(self.train):,} train / {len(self.valid):,} valid)"
        )

    def _windows(self, data, starts):
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        seq = data[idx].astype(np.int32)
        return seq, np.ones((len(starts), self.seq_len), np.float32)

    def batch(self, rng: np.random.Generator, batch_size: int):
        return self._windows(self.train, rng.integers(0, len(self.train) - self.seq_len - 1, batch_size))

    def eval_batches(self, batch_size: int, n: int):
        """[(seq, mask, {})]: evenly spaced windows, so that every run sees the same validation set."""
        starts = np.linspace(0, len(self.valid) - self.seq_len - 2, n * batch_size).astype(np.int64)
        return [(*self._windows(self.valid, s), {}) for s in starts.reshape(n, batch_size)]


class RecallTask:
    """Multi-query associative recall (Zoology's MQAR) with the pairs beyond the window.

    A sequence of seq_len + 1 tokens: filler bytes, `pairs` key-value pairs ("k v", keys
    distinct) at random places in the first `context` tokens, then at the very end the same
    keys in a new random order, each followed by its value. The loss is on predicting those
    final values from their key, so the answer for a query is always at least
    seq_len + 2 - 2 * pairs - context tokens back: with the defaults that is more than the
    window, and only the compressed/selected branches can fetch it.
    """

    KEYS = 16  # key tokens [16, 16 + num_keys)
    VALUES = 128  # value tokens [128, 128 + num_values)
    FILLER = 224  # filler tokens [224, 224 + 8)

    def __init__(self, args: argparse.Namespace):
        self.seq_len, self.pairs, self.block_size = args.seq_len, args.pairs, args.block_size
        self.num_keys, self.num_values = args.num_keys, args.num_values
        self.context = args.context if args.context > 0 else args.seq_len // 2
        if self.num_keys < self.pairs or self.num_keys > 96 or self.num_values > 96:
            raise ValueError(
                f"need pairs <= num_keys <= 96 and num_values <= 96, got pairs={self.pairs}, "
                f"num_keys={self.num_keys}, num_values={self.num_values}"
            )
        if 2 * self.pairs > self.context or self.context + 2 * self.pairs > self.seq_len:
            raise ValueError(
                f"{self.pairs} pairs need 2*pairs <= context and context + 2*pairs <= seq_len, got "
                f"context={self.context}, seq_len={self.seq_len}"
            )
        # The first query sits at seq_len + 1 - 2p, the last pair's value at most at context - 1.
        self.min_distance = self.seq_len + 2 - 2 * self.pairs - self.context
        self.description = (
            f"recall: {self.pairs} pairs in the first {self.context} of {self.seq_len} tokens, "
            f"{self.num_keys} keys, {self.num_values} values, every query >= {self.min_distance} tokens "
            f"after its pair (window {args.window})"
        )

    def batch(self, rng: np.random.Generator, batch_size: int, with_far: bool = False):
        n, p, c = self.seq_len + 1, self.pairs, self.context
        seq = self.FILLER + rng.integers(0, 8, (batch_size, n))
        mask = np.zeros((batch_size, n - 1), np.float32)
        far = np.zeros((batch_size, n - 1), np.float32)
        for b in range(batch_size):
            keys = self.KEYS + rng.choice(self.num_keys, p, replace=False)
            values = self.VALUES + rng.integers(0, self.num_values, p)
            # p non-overlapping pair slots among the first c tokens: choose p starts from
            # c - p positions and spread them by their rank so that pairs never touch.
            starts = np.sort(rng.choice(c - p, p, replace=False)) + np.arange(p)
            seq[b, starts], seq[b, starts + 1] = keys, values
            order = rng.permutation(p)
            q = n - 2 * p + 2 * np.arange(p)  # query slots at the end
            seq[b, q], seq[b, q + 1] = keys[order], values[order]
            mask[b, q] = 1.0  # target at input position q is seq[q + 1], the value
            # NSA always selects block 0 (semantics.md piece 3), so a pair there is reachable without
            # any learned selection; "far" queries have their pair wholly outside it.
            far[b, q] = starts[order] >= self.block_size
        if with_far:
            return seq.astype(np.int32), mask, far
        return seq.astype(np.int32), mask

    def eval_batches(self, batch_size: int, n: int):
        """[(seq, mask, {"far": far_mask})], the same set for every run (NSA and ablation)."""
        rng = np.random.default_rng(12345)
        out = []
        for _ in range(n):
            seq, mask, far = self.batch(rng, batch_size, with_far=True)
            out.append((seq, mask, {"far": far}))
        return out


# ---------------------------------------------------------------------------------------
# Training


def loss_and_accuracy(model: LM, seq, mask):
    logits = model(seq[:, :-1])
    targets = seq[:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    denom = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return (nll * mask).sum() / denom, (correct * mask).sum() / denom


@nnx.jit
def train_step(model: LM, optimizer: nnx.Optimizer, seq, mask):
    (loss, acc), grads = nnx.value_and_grad(loss_and_accuracy, has_aux=True)(model, seq, mask)
    optimizer.update(model, grads)
    return loss, acc


@nnx.jit
def eval_step(model: LM, seq, masks):
    """Sums (not means) of nll and correct predictions, and the count, per mask in `masks`."""
    logits = model(seq[:, :-1])
    targets = seq[:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {k: ((nll * m).sum(), (correct * m).sum(), m.sum()) for k, m in masks.items()}


# ---------------------------------------------------------------------------------------
# Generation with the KV cache


@nnx.jit
def decode_step(model: LM, tokens, num_new):
    return model(tokens, decode=True, num_new=num_new)


def sample_text(model: LM, task: TextTask, args) -> dict:
    """Prompts of different lengths from the validation text, prefilled together (num_new),
    then `args.generate` bytes sampled per prompt, one token per step for all rows."""
    lengths = np.array([96, 64, 40, 17])[: args.generate_rows]
    rows = len(lengths)
    starts = np.linspace(0, len(task.valid) - 200, rows).astype(np.int64)
    prompts = np.zeros((rows, lengths.max()), np.int32)
    for b, (s0, n) in enumerate(zip(starts, lengths)):
        prompts[b, :n] = task.valid[s0 : s0 + n]
    total = int(lengths.max()) + args.generate
    model.init_cache(rows, total)
    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    logits = decode_step(model, jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32))
    last = logits[jnp.arange(rows), jnp.asarray(lengths - 1)]  # each row's last real token
    out = []
    ones = jnp.ones((rows,), jnp.int32)
    t_prefill = t_steps = None
    for i in range(args.generate):
        key, sub = jax.random.split(key)
        tok = jax.random.categorical(sub, last / args.temperature)
        out.append(tok)
        if i == 1:  # the step has compiled: time the rest
            jax.block_until_ready(tok)
            t_steps = time.perf_counter()
        last = decode_step(model, tok[:, None].astype(jnp.int32), ones)[:, -1]
        if i == 0:
            jax.block_until_ready(last)
            t_prefill = time.perf_counter() - t0
    jax.block_until_ready(last)
    rate = rows * (args.generate - 2) / (time.perf_counter() - t_steps) if args.generate > 2 else None
    gen = np.stack([np.asarray(t) for t in out], axis=1)
    # The cache must give what the full forward gives: logits of the last generated token
    # of row 0, recomputed without a cache over its whole text.
    full_seq = np.concatenate([prompts[0, : lengths[0]], gen[0]])[None].astype(np.int32)
    full_last = model(jnp.asarray(full_seq))[0, -1]
    diff = float(jnp.max(jnp.abs(full_last - last[0])))
    samples = [bytes(prompts[b, : lengths[b]].tolist()).decode("utf-8", "replace") + " >>> "
               + bytes(gen[b].tolist()).decode("utf-8", "replace") for b in range(rows)]
    return {"rows": rows, "prompt_lengths": lengths.tolist(), "new_tokens": args.generate,
            "tokens_per_s": round(rate) if rate else None, "prefill_and_first_step_s": round(t_prefill, 2),
            "max_logit_diff_vs_full_forward": diff, "samples": samples}


def generate_recall(model: LM, task: RecallTask, args) -> dict:
    """Recall accuracy by generation: prefill each sequence up to its first query key, then
    generate the answer (argmax), feed it and the next query key, and so on; the answers the
    model sees are its own. The same loop fed the true answers instead ("teacher forced")
    must give the full forward's accuracy on these sequences: a check of the cache."""
    result = {}
    for mode in ("generated", "teacher_forced"):
        correct = total = 0
        for seq, _, _ in task.eval_batches(args.batch_size, args.generate):
            rows, n, p = seq.shape[0], seq.shape[1], task.pairs
            q = n - 2 * p + 2 * np.arange(p)  # query key positions; their values follow
            model.init_cache(rows, n)
            logits = decode_step(model, jnp.asarray(seq[:, : q[0] + 1]), jnp.full((rows,), q[0] + 1, jnp.int32))
            for j in range(p):
                answer = np.asarray(jnp.argmax(logits[:, -1], -1))
                correct += int(np.sum(answer == seq[:, q[j] + 1]))
                total += rows
                if j + 1 < p:  # feed the answer (the model's, or the true one) and the next query's key
                    fed = answer if mode == "generated" else seq[:, q[j] + 1]
                    step = np.stack([fed, seq[:, q[j + 1]]], axis=1).astype(np.int32)
                    logits = decode_step(model, jnp.asarray(step), jnp.full((rows,), 2, jnp.int32))
        result[f"recall_accuracy_{mode}"] = round(correct / max(total, 1), 4)
    result["generated_answers"] = total
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["text", "recall"], default="text")
    p.add_argument("--ablation", choices=["none", "window", "no-selection", "no-compression"], default="none",
                   help="window: the same layer with selection and compression switched off; "
                        "no-selection: compressed + window; no-compression: selected + window "
                        "(compressed scores still pick the blocks, the compressed output is dropped)")
    # Defaults marked (text/recall) differ by task: text is sized for a 2-core CPU (~2-3
    # minutes), recall for a GPU (a few minutes there; see docs/nnx.md for CPU-sized flags).
    p.add_argument("--steps", type=int, default=None, help="default: 200 (text), 3000 (recall)")
    p.add_argument("--seq-len", type=int, default=None, help="default: 256 (text), 512 (recall)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 (text), 64 (recall)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-counts", type=int, default=None,
                   help="selected blocks per token, 3 of them forced; default: 4 (text), 8 (recall)")
    p.add_argument("--window", type=int, default=None, help="sliding window; default: 32 (text), 64 (recall)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate; default 6e-3 (text), 2e-3 (recall)")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="computation dtype (parameters stay float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--platform", choices=["auto", "xla", "triton"], default="auto",
                   help="ejnsa platform: auto = Triton on GPU, XLA elsewhere")
    p.add_argument("--log-every", type=int, default=None, help="default: steps // 20")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out", default="runs/train_lm", help="output directory (PNG + summary JSON)")
    p.add_argument("--generate", type=int, default=None,
                   help="after training, with the KV cache: text: bytes to sample per prompt (default 120); "
                        "recall: eval batches whose answers are generated (default 1); 0: none")
    p.add_argument("--generate-rows", type=int, default=4, choices=[1, 2, 3, 4], help="text prompts sampled together")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of --generate (text)")
    g = p.add_argument_group("text task")
    g.add_argument("--text-bytes", type=int, default=4_000_000, help="bytes of stdlib source to read")
    g = p.add_argument_group("recall task")
    g.add_argument("--pairs", type=int, default=16, help="key-value pairs per sequence")
    g.add_argument("--num-keys", type=int, default=64)
    g.add_argument("--num-values", type=int, default=64)
    g.add_argument("--context", type=int, default=0, help="pairs lie in the first CONTEXT tokens; 0 = seq_len // 2")
    args = p.parse_args(argv)
    defaults = {
        "text": dict(steps=200, seq_len=256, batch_size=8, lr=6e-3, block_counts=4, window=32, generate=120),
        "recall": dict(steps=3000, seq_len=512, batch_size=64, lr=2e-3, block_counts=8, window=64, generate=1),
    }[args.task]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.log_every is None:
        args.log_every = max(1, args.steps // 20)
    return args


def save_plot(path: str, losses: list[float], title: str) -> None:
    import matplotlib  # imported here: only this function needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="per step")
    k = max(1, len(losses) // 50)
    if k > 1:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = TextTask(args) if args.task == "text" else RecallTask(args)
    run_name = args.task + ("" if args.ablation == "none" else f"-{args.ablation}")

    model = LM(args, rngs=nnx.Rngs(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(1, int(args.warmup * args.steps)), args.steps, end_value=0.1 * args.lr
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=args.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    attn = f"NSA block_size {args.block_size}, block_counts {args.block_counts}"
    attn = {"window": "window only", "no-selection": f"compressed (block_size {args.block_size}) + window",
            "no-compression": f"{attn} without the compressed output"}.get(args.ablation, attn)
    print(f"ejnsa {ejnsa.__version__} | jax {jax.__version__} on {jax.default_backend()} | platform {args.platform}")
    print(f"task: {task.description}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} kv, {attn}, "
          f"window {args.window}, {n_params:,} parameters")
    if args.task == "recall" and task.min_distance <= args.window:
        print(f"note: window {args.window} >= the nearest query-to-pair distance {task.min_distance}; "
              "the window alone can answer some queries")
    print(f"training: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr}")

    rng = np.random.default_rng(args.seed)
    losses, accs = [], []
    tokens_per_step = args.batch_size * args.seq_len
    t_start = time.perf_counter()
    t_compiled = None  # time after the first (compiling) step; tokens/s excludes compilation
    for step in range(1, args.steps + 1):
        seq, mask = task.batch(rng, args.batch_size)
        loss, acc = train_step(model, optimizer, jnp.asarray(seq), jnp.asarray(mask))
        losses.append(loss)
        accs.append(acc)
        if step == 1:
            loss.block_until_ready()
            t_compiled = time.perf_counter()
            print(f"step {step:5d} | loss {float(loss):.4f} | compiled in {t_compiled - t_start:.1f}s", flush=True)
        elif step % args.log_every == 0 or step == args.steps:
            loss = float(loss)  # waits for the step, so the rate below is honest
            now = time.perf_counter()
            rate = (step - 1) * tokens_per_step / (now - t_compiled)
            extra = f" | answer acc {float(acc):.3f}" if args.task == "recall" else ""
            print(f"step {step:5d} | loss {loss:.4f}{extra} | {rate:,.0f} tok/s | {now - t_start:.1f}s", flush=True)
    train_time = time.perf_counter() - t_start
    losses = [float(x) for x in losses]
    accs = [float(x) for x in accs]

    sums = {}
    for seq, mask, extra_masks in task.eval_batches(args.batch_size, args.eval_batches):
        masks = {"all": mask, **extra_masks}
        out = eval_step(model, jnp.asarray(seq), {k: jnp.asarray(m) for k, m in masks.items()})
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + np.array([float(x) for x in v])
    eval_loss = sums["all"][0] / sums["all"][2]
    eval_acc = sums["all"][1] / sums["all"][2]

    tail = losses[-max(1, len(losses) // 20):]
    summary = {
        "task": args.task,
        "ablation": args.ablation,
        "initial_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "final_loss_mean_last_5pct": round(float(np.mean(tail)), 4),
        "eval_loss": round(float(eval_loss), 4),
        "steps": args.steps,
        "tokens_per_s": round((args.steps - 1) * tokens_per_step / (train_time - (t_compiled - t_start)))
        if args.steps > 1 else None,
        "wall_s": round(train_time, 1),
        "compile_s": round(t_compiled - t_start, 1),
        "params": int(n_params),
        "backend": jax.default_backend(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "log_every", "eval_batches")},
    }
    if args.task == "recall":
        summary["recall_accuracy"] = round(float(eval_acc), 4)
        # Accuracy on the queries whose pair is outside block 0 (always selected by NSA).
        summary["recall_accuracy_far"] = round(float(sums["far"][1] / max(sums["far"][2], 1)), 4)
        summary["eval_answers"] = int(sums["all"][2])
        summary["recall_chance"] = round(1.0 / args.num_values, 4)
        summary["min_distance"] = task.min_distance
    else:
        summary["eval_bits_per_byte"] = round(float(eval_loss) / math.log(2), 4)

    if args.generate and args.ablation in ("none", "no-compression"):  # the cached step runs the full NSA
        if args.task == "text":
            gen = sample_text(model, task, args)
            print(f"sampled {gen['new_tokens']} bytes for {gen['rows']} prompts of {gen['prompt_lengths']} bytes "
                  f"with the KV cache: {gen['tokens_per_s']:,} tok/s; last logits vs the full forward: max diff "
                  f"{gen['max_logit_diff_vs_full_forward']:.1e}")
            for sample in gen["samples"]:
                print("  " + repr(sample))
        else:
            gen = generate_recall(model, task, args)
            print(f"recall accuracy by generation with the KV cache: {gen['recall_accuracy_generated']:.4f} "
                  f"over {gen['generated_answers']} answers (fed the true answers instead: "
                  f"{gen['recall_accuracy_teacher_forced']:.4f})")
        summary["generate"] = gen

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"{run_name}_loss.png")
    save_plot(png, losses, f"{run_name}: {args.layers}x{args.hidden}, {attn}, window {args.window}")
    with open(os.path.join(args.out, f"{run_name}_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print(f"initial loss {losses[0]:.4f} -> final loss {losses[-1]:.4f} "
          f"(mean of last {len(tail)}: {np.mean(tail):.4f}); eval loss {eval_loss:.4f}"
          + (f"; recall accuracy {summary['recall_accuracy']:.4f} (outside block 0: "
             f"{summary['recall_accuracy_far']:.4f}; chance {summary['recall_chance']})"
             if args.task == "recall" else f" ({summary['eval_bits_per_byte']:.3f} bits/byte)"))
    print(f"wrote {png} and {os.path.join(args.out, run_name + '_summary.json')}")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary


if __name__ == "__main__":
    main()
