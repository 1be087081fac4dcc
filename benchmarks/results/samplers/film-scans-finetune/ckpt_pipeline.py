"""The packaged pipeline with its UNet replaced by a training checkpoint's EMA weights, for a check part-way.

    python results/samplers/film-scans-finetune/ckpt_pipeline.py FILM/checkpoint-3250 FILM-3250

The weights are stored in bfloat16, as `package_model.py` packages them; the guide and settings stay the packaged ones.
"""

import argparse
import importlib.util
import pathlib

from diffusers_sr3 import SR3Pipeline

BENCHMARKS = pathlib.Path(__file__).resolve().parents[3]
PACKAGED = BENCHMARKS.parent / "src" / "diffusers_sr3" / "pretrained" / "sr3-photos-x4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint folder (OUTPUT_DIR/checkpoint-<step>)")
    parser.add_argument("output", help="the pipeline folder to write")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("package_model", BENCHMARKS / "package_model.py")
    package_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package_model)
    pipeline = SR3Pipeline.from_pretrained(PACKAGED)
    pipeline.unet = package_model.to_bfloat16(package_model.load_unet(args.checkpoint))
    pipeline.save_pretrained(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
