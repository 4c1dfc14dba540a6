"""Peak memory of checkpoint conversion above the imports, against the model's size.

    python benchmarks/conversion_memory.py --workdir /tmp/convmem            # ~560 MB fp32 model
    python benchmarks/conversion_memory.py --workdir /tmp/convmem --layers 2 --hidden 512   # quick
    python benchmarks/conversion_memory.py --workdir /tmp/convmem --hf-dir HF_DIR  # an existing model

Builds a random Llama with transformers on CPU (fp32, saved in shards of --shard-mb), or takes
--hf-dir, then runs hf-to-megatron and megatron-to-hf, each in a fresh process that first
imports everything and creates its process group, reads its resident memory, converts, and
reports the peak resident memory (VmHWM) minus that baseline. Printed: the model's bytes,
its largest shard, one layer and its largest megatron weight (the embedding, or a fused
gate/up), and each direction's peak in MB, as a multiple of the model's size and of (largest
shard + one layer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
from pathlib import Path
import torch
from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_harpe.convert.megatron_side import ensure_single_process

def status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

ensure_single_process()
direction, source, target = sys.argv[1:4]
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current size
baseline = status_bytes("VmRSS")
if direction == "hf-to-megatron":
    convert_hf_to_megatron(source, target)
else:
    convert_megatron_to_hf(source, target)
print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM")}))
"""
# Why VmHWM after clear_refs and not ru_maxrss: Linux carries ru_maxrss across exec, and
# subprocess starts the child with vfork, so ru_maxrss starts at the parent's resident size
# (this script's, which held a whole model when it made one).


def make_model(directory: Path, layers: int, hidden: int, vocab: int, shard_mb: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size=f"{shard_mb}MB")


def model_sizes(directory: Path) -> dict:
    """Bytes of the whole model, its largest shard, layer 0 and its largest megatron weight."""
    from megatron_harpe.convert.hf_files import HFWeights

    weights = HFWeights(directory)
    nbytes = {name: math.prod(weights.shape(name)) * weights.dtype(name).itemsize for name in weights.names}
    fused_fc1 = nbytes["model.layers.0.mlp.gate_proj.weight"] + nbytes["model.layers.0.mlp.up_proj.weight"]
    shards = [f.stat().st_size for f in directory.glob("*.safetensors")]
    return {
        "model_bytes": sum(nbytes.values()),
        "layer_bytes": sum(size for name, size in nbytes.items() if name.startswith("model.layers.0.")),
        "largest_weight_bytes": max(nbytes["model.embed_tokens.weight"], fused_fc1),
        "largest_shard_bytes": max(shards),
        "shards": len(shards),
    }


def measure(direction: str, source: Path, target: Path) -> dict:
    environment = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, direction, str(source), str(target)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{direction} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="an empty or new directory for the three models")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--hf-dir", type=Path, help="measure this HF model (safetensors) instead of a random one")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    hf, megatron, export = args.hf_dir or work / "hf", work / "megatron", work / "export"
    if args.hf_dir is None:
        make_model(hf, args.layers, args.hidden, args.vocab, args.shard_mb)
    sizes = model_sizes(hf)
    mb = 2**20
    bound = sizes["largest_shard_bytes"] + sizes["layer_bytes"]
    print(
        f"model {sizes['model_bytes'] / mb:.0f} MB, {sizes['shards']} shards (largest "
        f"{sizes['largest_shard_bytes'] / mb:.0f} MB), one layer {sizes['layer_bytes'] / mb:.0f} MB, largest "
        f"megatron weight {sizes['largest_weight_bytes'] / mb:.0f} MB"
    )
    for direction, source, target in (("hf-to-megatron", hf, megatron), ("megatron-to-hf", megatron, export)):
        found = measure(direction, source, target)
        above = found["peak"] - found["baseline"]
        print(
            f"{direction:15s} peak above imports {above / mb:7.0f} MB = {above / sizes['model_bytes']:.2f}x the model "
            f"= {above / bound:.2f}x (largest shard + one layer) = {above / sizes['largest_weight_bytes']:.2f}x "
            "the largest weight"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
