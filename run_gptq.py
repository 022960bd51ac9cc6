"""Quantize a Qwen checkpoint to GPTQ Int4 / Int8 with GPT-QModel; the output directory loads as it is.

    python run_gptq.py --model_name_or_path Qwen/Qwen-1_8B-Chat --data_path calib.json \\
        --out_path Qwen-1_8B-Chat-Int4 --bits 4
    python cli_demo.py -c Qwen-1_8B-Chat-Int4
    python run_gptq.py --data_path examples/finetune_data.json --out_path demo-Int4   # the offline demo model

--data_path is a fine-tuning data file (the format finetune.py reads); its conversations, rendered as ChatML and
cut at --max_len tokens, are the calibration samples. Needs `pip install -r requirements-gptq.txt`.
"""

import argparse
import sys

from qwen.quantize import GPTQ_BITS, GPTQ_GROUP_SIZE
from qwen.scripts import exit_on_user_error, quiet_libraries


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=None,
                        help="checkpoint directory or hub id to quantize (default: the offline demo model)")
    parser.add_argument("--data_path", required=True, help="calibration data in the fine-tuning format (JSON)")
    parser.add_argument("--out_path", required=True, help="new directory for the quantized checkpoint")
    parser.add_argument("--bits", type=int, default=4, choices=GPTQ_BITS, help="4 (Int4) or 8 (Int8)")
    parser.add_argument("--group-size", type=int, default=GPTQ_GROUP_SIZE,
                        help=f"columns sharing one scale and zero point (default {GPTQ_GROUP_SIZE}, as the hub)")
    parser.add_argument("--max_len", type=int, default=8192, help="calibration samples are cut at this many tokens")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="use only the first N conversations of --data_path (default: all)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    with exit_on_user_error():
        from transformers import AutoTokenizer

        import qwen  # noqa: F401  registers the QWen tokenizer and model
        from qwen.loading import check_checkpoint, demo_path, resolve_checkpoint
        from qwen.quantize import quantize
        from qwen.sft import calibration_samples

        source = resolve_checkpoint(args.model_name_or_path) if args.model_name_or_path else demo_path()
        check_checkpoint(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        samples = calibration_samples(tokenizer, args.data_path, args.max_len, args.num_samples)
        print(f"Quantizing {source} to GPTQ Int{args.bits} (group size {args.group_size}) on {len(samples)} "
              "calibration samples", file=sys.stderr)
        out = quantize(source, args.out_path, samples, bits=args.bits, group_size=args.group_size)
        print(f"Wrote {out}: load it with `python cli_demo.py -c {out}` or AutoModelForCausalLM.from_pretrained.")


if __name__ == "__main__":
    main()
