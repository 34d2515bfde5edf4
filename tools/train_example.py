"""Train the two tiny Mixtral-format example MoEs that ship with streammerge.

Text: the reST sources of the Python 3.11 documentation from the Debian package
python3.11-doc (PSF-2.0; code examples also 0BSD), fetched with `apt-get download`.
Writes, under the package directory:
  data/calibration.txt, data/heldout.txt, data/README.md   (text split by file)
  examples/upcycled/   dense Mistral trained first, MLP copied into 8 experts, trained on as MoE
  examples/scratch/    same Mixtral config from random init, same total token budget
  examples/README.md   model card with every number measured here

    nice -n 10 python tools/train_example.py
"""

import argparse
import json
import logging
import math
import random
import re
import subprocess
import time
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers import PreTrainedTokenizerFast

log = logging.getLogger("train_example")

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "streammerge"
DOC_PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]  # ids 0..3 in this order
BOS, EOS, UNK, PAD = range(4)

# reST lines that carry no prose: directive heads whose indented option/argument lines go with them.
MARKUP_DIRECTIVE = re.compile(
    r"^\s*\.\. (index|module|include|only|currentmodule|moduleauthor|sectionauthor|highlight|testsetup|testcleanup"
    r"|toctree|seealso|_[^:]+|\|[^|]+\| \w+)::?"
)
UNDERLINE = re.compile(r"^\s*([=\-~^*#+\"'`.:])\1{3,}\s*$")  # section title underlines


# ---------------------------------------------------------------- text


def fetch_doc_sources(cache: Path) -> tuple[Path, str]:
    """Download and unpack python3.11-doc into cache; return its _sources dir and package version."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{DOC_PACKAGE}_*.deb"))
    if not debs:
        if subprocess.run(["apt-get", "download", DOC_PACKAGE], cwd=cache).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(["apt-get", "download", DOC_PACKAGE], cwd=cache, check=True)
        debs = sorted(cache.glob(f"{DOC_PACKAGE}_*.deb"))
    deb = debs[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
    unpacked = cache / deb.stem
    if not (unpacked / SOURCES).is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return unpacked / SOURCES, version.stdout.strip()


def clean_rest(text: str) -> str:
    """Drop pure-markup lines (index entries, module headers, title underlines), collapse blank runs."""
    kept, skipping_block = [], False
    for line in text.splitlines():
        if skipping_block and line.startswith((" ", "\t")) and line.strip():
            continue  # option/argument lines of a dropped directive
        skipping_block = bool(MARKUP_DIRECTIVE.match(line))
        if skipping_block or UNDERLINE.match(line):
            continue
        kept.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip() + "\n"


def load_documents(sources: Path) -> tuple[list[str], list[str]]:
    """(train, heldout) documents. A file is held out iff crc32(relative path) % 10 == 0,
    so held-out text never appears in training and the split does not depend on file order."""
    train, heldout = [], []
    for path in sorted(sources.rglob("*.rst.txt")):
        relative = path.relative_to(sources).as_posix()
        text = clean_rest(path.read_text(encoding="utf-8"))
        if len(text) > 200:  # skip near-empty index pages
            (heldout if zlib.crc32(relative.encode()) % 10 == 0 else train).append(text)
    return train, heldout


def sample_text(documents: list[str], target_bytes: int, per_document: int, seed: int) -> str:
    """A varied excerpt: documents in seeded random order, at most per_document chars of each,
    cut at paragraph ends, until target_bytes is reached."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    parts, size = [], 0
    for i in order:
        doc = documents[i]
        if len(doc) > per_document:
            doc = doc[: doc.rfind("\n\n", 0, per_document)].rstrip() + "\n"
        parts.append(doc)
        size += len(doc.encode()) + 1
        if size >= target_bytes:
            break
    return "\n".join(parts)


# ---------------------------------------------------------------- tokenizer and batches


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    # Every training document starts with <s>, so prompts encoded with special tokens look like training text.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=512,
    )


def encode_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one token stream: <s> doc </s> <s> doc </s> ..."""
    # backend_tokenizer: same ids as tokenizer(...), without the warning that documents exceed model_max_length
    encodings = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    return torch.tensor([t for e in encodings for t in [BOS, *e.ids, EOS]], dtype=torch.long)


def random_batches(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def heldout_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """heldout.txt as non-overlapping seq_len windows of `tokenizer(text)` (leading <s>); remainder dropped."""
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text).ids)
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


# ---------------------------------------------------------------- models


def model_configs(vocab_size: int, args) -> tuple[MistralConfig, MixtralConfig]:
    shared = dict(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
        max_position_embeddings=512, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    moe = MixtralConfig(
        **shared, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, output_router_logits=True
    )
    return MistralConfig(**shared), moe


@torch.no_grad()
def upcycle(dense: MistralForCausalLM, moe_config: MixtralConfig, noise: float, seed: int) -> MixtralForCausalLM:
    """Mixtral whose every expert is the dense MLP plus relative noise; router stays randomly initialised.
    With top-2 weights renormalised to sum 1 the MoE starts out computing (almost) the dense function."""
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(moe_config)
    shared = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}  # attention, norms, embeddings
    missing, unexpected = moe.load_state_dict(shared, strict=False)
    assert not unexpected and all(".mlp." in k for k in missing), (missing, unexpected)
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        experts = moe_layer.mlp.experts
        gate_up = torch.cat([dense_layer.mlp.gate_proj.weight, dense_layer.mlp.up_proj.weight])  # [2I, H], gate first
        down = dense_layer.mlp.down_proj.weight  # [H, I]
        for fused, weight in ((experts.gate_up_proj, gate_up), (experts.down_proj, down)):
            fused.copy_(weight.expand_as(fused))
            fused.add_(torch.randn_like(fused) * noise * weight.std())
    return moe


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # decays to 10% of peak


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    total = 0.0
    for batch in windows.split(batch_size):
        # output_router_logits=False: report pure language-model loss, without the balancing term
        total += model(input_ids=batch, labels=batch, output_router_logits=False).loss.item() * len(batch)
    model.train()
    return total / len(windows)


def train(name, model, batches, windows, steps, peak_lr, args) -> list[tuple[int, float]]:
    """AdamW + warmup/cosine. Returns the held-out loss curve [(step, loss)]."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr, betas=(0.9, 0.95),
    )
    curve = [(0, heldout_loss(model, windows))]
    log.info("%s step 0/%d heldout loss %.3f", name, steps, curve[-1][1])
    started = time.time()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr, args.warmup)
        batch = next(batches)
        out = model(input_ids=batch, labels=batch)  # MoE: .loss already includes router_aux_loss_coef * aux_loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, heldout_loss(model, windows)))
            aux = getattr(out, "aux_loss", None)
            log.info(
                "%s step %d/%d train loss %.3f%s heldout loss %.3f (%.2f s/step)", name, step + 1, steps,
                out.loss.item(), f" (aux {aux.item():.3f})" if aux is not None else "", curve[-1][1],
                (time.time() - started) / (step + 1),
            )
    return curve


# ---------------------------------------------------------------- measurements


@torch.no_grad()
def expert_usage(model: MixtralForCausalLM, windows: torch.Tensor) -> list[list[float]]:
    """Per layer, the fraction of all top-k selections that went to each expert on held-out text."""
    counts = torch.zeros(model.config.num_hidden_layers, model.config.num_local_experts)
    for batch in windows.split(16):
        router_logits = model(input_ids=batch, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            chosen = logits.topk(model.config.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(chosen.flatten(), minlength=counts.shape[1])
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


@torch.no_grad()
def expert_cosine(model: MixtralForCausalLM) -> list[float]:
    """Per layer, mean pairwise cosine similarity of experts' flattened (w1, w3, w2) weights."""
    means = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        flat = torch.cat([experts.gate_up_proj.flatten(1), experts.down_proj.flatten(1)], dim=1).float()
        flat = torch.nn.functional.normalize(flat, dim=1)
        similarity = flat @ flat.T
        n = len(flat)
        means.append(((similarity.sum() - n) / (n * (n - 1))).item())
    return means


def save(model, tokenizer, directory: Path, max_shard_size: str):
    model.config.output_router_logits = False  # inference default: no router logits, no aux loss
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("model*.safetensors*"):
        old.unlink()  # a rerun with another shard count must not leave stale shards behind
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    for shard in directory.glob("model*.safetensors"):
        shard.chmod(0o644)  # safetensors writes 0600; these files are shipped
    tokenizer.save_pretrained(directory)


def directory_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


# ---------------------------------------------------------------- reports


def write_data_readme(path: Path, version: str, n_train: int, n_heldout: int, files: dict, command: str):
    path.write_text(f"""# Text data

Source: the reStructuredText sources of the Python 3.11 documentation
(`{SOURCES}/**/*.rst.txt`) from the Debian package
`{DOC_PACKAGE}` version `{version}`, fetched with `apt-get download {DOC_PACKAGE}` and unpacked
with `dpkg-deb -x` (nothing is installed).

Licence: PSF License Agreement Version 2 (SPDX `PSF-2.0`); since Python 3.8.6 the examples,
recipes and other code in the documentation are additionally licensed under the Zero-Clause BSD
licence (SPDX `0BSD`). See `license.rst.txt` in the package and
`/usr/share/doc/{DOC_PACKAGE}/copyright`.

Cleanup: lines that are only reST markup (`.. index::`, `.. module::`, author, `highlight`,
`toctree`, link targets and their indented option lines; title underlines) are dropped and runs
of blank lines collapsed; everything else is kept verbatim.

Split by file: a file is held out when `zlib.crc32(path relative to _sources) % 10 == 0`.
{n_train} files are training text, {n_heldout} held out; held-out text never appears in training
(neither of the example models nor of their tokenizer).

| file | split | bytes | what |
| --- | --- | --- | --- |
| `calibration.txt` | train | {files['calibration.txt']} | default calibration text of streammerge |
| `heldout.txt` | held-out | {files['heldout.txt']} | perplexity evaluation text |

Both are excerpts: documents in seeded random order, at most the first ~16 KB of each (cut at a
paragraph end), documents separated by a blank line, until the size is reached.

Regenerate (also retrains the example models): `{command}`
""")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_model_card(path: Path, r: dict):
    cfg, n_experts = r["config"], r["config"]["num_local_experts"]
    curves = r["curves"]

    def usage_table(usage):
        return table(["layer"] + [f"e{e}" for e in range(n_experts)],
                     [[i] + [f"{u:.3f}" for u in row] for i, row in enumerate(usage)])

    def curve_table(curve):
        return table(["step", "held-out loss", "perplexity"], [[s, f"{l:.3f}", f"{math.exp(l):.1f}"] for s, l in curve])

    path.write_text(f"""# Example models

Two tiny Mixtral-format Mixture-of-Experts language models trained by `tools/train_example.py`
on the Python 3.11 documentation: real (trained) MoEs small enough to ship. `upcycled/` is the
quick start's example; both are there for the quality tests and tools.

| | `upcycled/` | `scratch/` |
| --- | --- | --- |
| how | dense Mistral trained {r['dense_steps']} steps, its MLP copied into all {n_experts} experts (+{r['noise']} relative noise), trained {r['moe_steps']} steps as MoE | same Mixtral config, random init, trained {r['scratch_steps']} steps |
| held-out perplexity | **{r['ppl']['upcycled']:.2f}** | **{r['ppl']['scratch']:.2f}** |
| mean pairwise expert cosine (layers 0..{cfg['num_hidden_layers'] - 1}) | {', '.join(f'{c:.3f}' for c in r['cosine']['upcycled'])} | {', '.join(f'{c:.3f}' for c in r['cosine']['scratch'])} |
| size on disk | {r['size']['upcycled'] / 1e6:.2f} MB | {r['size']['scratch'] / 1e6:.2f} MB |

Reference perplexities on the same text: untrained (random init) {r['ppl']['untrained']:.1f};
dense parent of `upcycled/` {r['ppl']['dense']:.2f}.

## Architecture

`MixtralForCausalLM`: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {n_experts} experts of
intermediate size {cfg['intermediate_size']} (SwiGLU: w1 gate, w3 up, w2 down), top-{cfg['num_experts_per_tok']}
routing, {cfg['num_attention_heads']} attention heads / {cfg['num_key_value_heads']} KV heads (head_dim {cfg['head_dim']}),
RoPE theta 10000, max positions {cfg['max_position_embeddings']}, untied embeddings, vocabulary {cfg['vocab_size']},
{r['params']:,} parameters. Stored in bfloat16 in {r['shards']} safetensors shards with the Hub
per-expert tensor names (`model.layers.N.block_sparse_moe.experts.E.w1.weight`, router
`...block_sparse_moe.gate.weight`); `output_router_logits` is false in the saved config.

Tokenizer: byte-level BPE (`tokenizers`), {cfg['vocab_size']} tokens, trained on the training split only;
special tokens `<s>`=0 (bos, prepended by the tokenizer), `</s>`=1 (eos), `<unk>`=2, `<pad>`=3.
Load with `AutoTokenizer.from_pretrained(dir)`.

## Data

Python 3.11 documentation sources from the Debian package `{DOC_PACKAGE}` {r['doc_version']}
(PSF-2.0; code examples also 0BSD), split by file into training ({r['train_tokens']:,} tokens) and
held-out text; see `../data/README.md`. Training documents are encoded as `<s> text </s>` and
concatenated; batches are random {r['seq_len']}-token windows of that stream.

## Training recipe

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices except embeddings, grad clip 1.0), batch {r['batch']} x {r['seq_len']} tokens,
linear warmup {r['warmup']} steps then cosine decay to 10% of peak; seed {r['seed']}; CPU, {r['threads']} threads.
MoE training adds the Switch load-balancing loss with `router_aux_loss_coef` {r['aux_coef']}
(`output_router_logits=True`, added to `.loss` by `MixtralForCausalLM`). Note that transformers
computes it over the selections of all layers pooled, so it balances the total load per expert
index, not each layer: individual layers keep clearly uneven, sometimes near-unused experts (below).

- upcycled: dense `MistralForCausalLM` (same sizes, MLP = one expert) {r['dense_steps']} steps at peak lr {r['dense_lr']};
  then attention, norms and embeddings copied, the dense MLP copied into every expert with
  Gaussian noise of {r['noise']} x the weight's std, random router, {r['moe_steps']} MoE steps at peak lr {r['moe_lr']}.
- scratch: {r['scratch_steps']} MoE steps at peak lr {r['scratch_lr']} = the same {r['scratch_steps'] * r['batch'] * r['seq_len']:,} training tokens as both upcycling phases.

Wall time as measured (nice 10, 2 cores; slower when other jobs share the CPU): dense {r['minutes']['dense']:.1f} min, upcycled MoE {r['minutes']['moe']:.1f} min,
scratch {r['minutes']['scratch']:.1f} min; whole script {r['minutes']['total']:.1f} min.

## Evaluation

Held-out perplexity = exp(mean token cross-entropy) over `../data/heldout.txt` encoded with the
tokenizer (leading `<s>`), cut into {r['windows']} non-overlapping {r['seq_len']}-token windows, each scored
independently. The numbers above are of the float32 models at the end of training; the saved
bfloat16 weights give upcycled {r['ppl_saved']['upcycled']:.2f}, scratch {r['ppl_saved']['scratch']:.2f}.

Expert usage: fraction of all top-{cfg['num_experts_per_tok']} selections per expert on the held-out windows
(each row sums to 1; uniform = {1 / n_experts:.3f}).

### upcycled

{usage_table(r['usage']['upcycled'])}

### scratch

{usage_table(r['usage']['scratch'])}

Expert weight similarity: for each layer, the mean over all {n_experts * (n_experts - 1) // 2} expert pairs of the cosine
similarity of the experts' flattened (w1, w3, w2) weights. Upcycled experts start as copies
(cosine ~1) and stay similar; scratch experts start independent (cosine ~0).

### Held-out loss during training

dense parent:

{curve_table(curves['dense'])}

upcycled, MoE phase:

{curve_table(curves['moe'])}

scratch:

{curve_table(curves['scratch'])}

## Regenerate

```
{r['command']}
```

Deterministic given the seed and thread count (the CPU kernels may differ across machines in the
last bits). Needs `apt-get` (Debian) for the text; took {r['minutes']['total']:.0f} minutes here (see wall time above).
""")


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR / "examples", help="where upcycled/ and scratch/ go")
    parser.add_argument("--data-out", type=Path, default=PACKAGE_DIR / "data", help="where the text files go")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "streammerge")
    parser.add_argument("--dense-steps", type=int, default=450)
    parser.add_argument("--moe-steps", type=int, default=450)
    parser.add_argument("--dense-lr", type=float, default=2e-3)
    parser.add_argument("--moe-lr", type=float, default=1e-3)
    parser.add_argument("--scratch-lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=75)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--noise", type=float, default=0.01, help="upcycling noise, relative to weight std")
    parser.add_argument("--max-shard-size", default="3MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    started = time.time()
    command = "nice -n 10 python tools/train_example.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k not in ("out", "data_out", "cache")
    )

    sources, doc_version = fetch_doc_sources(args.cache)
    train_docs, heldout_docs = load_documents(sources)
    log.info("%s %s: %d train files (%.1f MB), %d held-out files (%.1f MB)", DOC_PACKAGE, doc_version,
             len(train_docs), sum(map(len, train_docs)) / 1e6, len(heldout_docs), sum(map(len, heldout_docs)) / 1e6)
    args.data_out.mkdir(parents=True, exist_ok=True)
    texts = {"calibration.txt": sample_text(train_docs, 300_000, 16_000, args.seed),
             "heldout.txt": sample_text(heldout_docs, 150_000, 16_000, args.seed)}
    for name, text in texts.items():
        (args.data_out / name).write_text(text, encoding="utf-8")
    write_data_readme(args.data_out / "README.md", doc_version, len(train_docs), len(heldout_docs),
                      {n: len(t.encode()) for n, t in texts.items()}, command)

    tokenizer = train_tokenizer(train_docs, args.vocab)
    stream = encode_stream(tokenizer, train_docs)
    windows = heldout_windows(tokenizer, texts["heldout.txt"], args.seq_len)
    log.info("tokenizer: %d tokens; train stream %d tokens; %d held-out windows", len(tokenizer), len(stream), len(windows))
    dense_config, moe_config = model_configs(len(tokenizer), args)

    r = dict(dense_steps=args.dense_steps, moe_steps=args.moe_steps, scratch_steps=args.dense_steps + args.moe_steps,
             dense_lr=args.dense_lr, moe_lr=args.moe_lr, scratch_lr=args.scratch_lr, noise=args.noise,
             batch=args.batch, seq_len=args.seq_len, threads=args.threads, warmup=args.warmup, seed=args.seed,
             aux_coef=moe_config.router_aux_loss_coef, doc_version=doc_version, train_tokens=len(stream),
             windows=len(windows), command=command, curves={}, minutes={}, ppl={}, ppl_saved={},
             usage={}, cosine={}, size={})

    # upcycled: dense parent first, then its MLP in every expert
    torch.manual_seed(args.seed)
    dense = MistralForCausalLM(dense_config)
    t = time.time()
    r["curves"]["dense"] = train("dense", dense, random_batches(stream, args.batch, args.seq_len, args.seed),
                                 windows, args.dense_steps, args.dense_lr, args)
    r["minutes"]["dense"] = (time.time() - t) / 60
    r["ppl"]["untrained"] = math.exp(r["curves"]["dense"][0][1])
    r["ppl"]["dense"] = math.exp(r["curves"]["dense"][-1][1])
    upcycled = upcycle(dense, moe_config, args.noise, args.seed + 1)
    t = time.time()
    # the MoE phase continues on fresh batches, not a replay of the dense phase's
    r["curves"]["moe"] = train("upcycled", upcycled, random_batches(stream, args.batch, args.seq_len, args.seed + 1),
                               windows, args.moe_steps, args.moe_lr, args)
    r["minutes"]["moe"] = (time.time() - t) / 60

    torch.manual_seed(args.seed)
    scratch = MixtralForCausalLM(moe_config)
    t = time.time()
    r["curves"]["scratch"] = train("scratch", scratch, random_batches(stream, args.batch, args.seq_len, args.seed),
                                   windows, r["scratch_steps"], args.scratch_lr, args)
    r["minutes"]["scratch"] = (time.time() - t) / 60

    for name, model in (("upcycled", upcycled), ("scratch", scratch)):
        model.eval()
        r["ppl"][name] = math.exp(r["curves"]["moe" if name == "upcycled" else "scratch"][-1][1])
        r["usage"][name] = expert_usage(model, windows)
        r["cosine"][name] = expert_cosine(model)
        save(model, tokenizer, args.out / name, args.max_shard_size)
        r["ppl_saved"][name] = math.exp(heldout_loss(model, windows))  # model is bfloat16 now
        r["size"][name] = directory_size(args.out / name)
        log.info("%s: heldout ppl %.2f (bf16 %.2f), expert cosine per layer %s, usage %s, %.2f MB", name,
                 r["ppl"][name], r["ppl_saved"][name], [round(c, 3) for c in r["cosine"][name]],
                 [[round(u, 3) for u in row] for row in r["usage"][name]], r["size"][name] / 1e6)
    r["config"] = scratch.config.to_dict()
    r["params"] = sum(p.numel() for p in scratch.parameters())
    r["shards"] = len(list((args.out / "upcycled").glob("model-*.safetensors")))
    r["minutes"]["total"] = (time.time() - started) / 60
    log.info("untrained ppl %.1f, dense ppl %.2f; total %.1f min", r["ppl"]["untrained"], r["ppl"]["dense"],
             r["minutes"]["total"])
    write_model_card(args.out / "README.md", r)
    # raw numbers, so the card can be re-rendered without retraining: write_model_card(path, json.load(...))
    (args.cache / "train_example_results.json").write_text(json.dumps(r, indent=1, default=str))


if __name__ == "__main__":
    main()
