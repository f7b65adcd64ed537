"""Token merging on the SD v1 UNet at 512x512 (bf16, random weights at the released sizes, as sd_cpu.py writes
them): seconds per classifier-free-guided step and the step's relative error against no merging, per ratio.

    python benchmarks/token_merging.py [--ratios 0 0.3 0.5] [--repeats 2] [--max-downsample 1]

Random weights make the error a stress figure (a trained UNet's features are smoother, so they merge better);
the quality cost on a trained model is the shapes demo's judged adherence.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd_cpu import CHECKPOINT_VERSION, ensure_checkpoint, timed  # noqa: E402

from latentgen import LatentDiffusionPipeline, registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-downsample", type=int, default=1)
    parser.add_argument("--spec", type=Path, default=REPO.parent / "shared" / "spec" / "sd-v1-keys.tsv")
    parser.add_argument("--file", type=Path,
                        default=Path(tempfile.gettempdir()) / f"sd-v1-random-v{CHECKPOINT_VERSION}.safetensors")
    args = parser.parse_args()
    ensure_checkpoint(args.spec, args.file)
    pipe = LatentDiffusionPipeline.from_checkpoint(args.file, dtype=torch.bfloat16)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        cond = pipe.conditioner({"prompt": ["a photograph of an astronaut riding a horse", ""]})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD v1 UNet, CFG batch 2, 512x512, bf16\n")
    print("| ratio | tokens at 64x64 | s / step | speed-up | relative error of the step |")
    print("|---|---|---|---|---|")
    reference, base = None, None
    for ratio in args.ratios:
        adapter = registry.build("adapter", "token_merging", ratio=ratio, max_downsample=args.max_downsample)
        pipe.attach(adapter)
        with torch.no_grad():
            seconds, _, out = timed(lambda: pipe.denoiser(x, t, cond), args.repeats)
        pipe.detach(adapter)
        reference = out.float() if reference is None else reference
        base = seconds if base is None else base
        error = ((out.float() - reference).norm() / reference.norm()).item()
        print(f"| {ratio:.1f} | {4096 - int(4096 * ratio) if ratio else 4096} | {seconds:.2f} | {base / seconds:.2f}x | "
              f"{error:.3f} |")


if __name__ == "__main__":
    main()
