"""What the eval/evaluate_*.py scripts share (see eval/EVALUATION.md).

data        the benchmarks' files in their download layouts, subject/category tables
prompts     the original scripts' prompts (few-shot and chat), choice tokens
scoring     batched multiple-choice log-likelihood (shared few-shot prefix, left padding + attention mask)
generation  batched greedy generation through qwen.engine (each script's decoding), with stop strings
extract     answers out of model text, the original's reading and the corrected one; Rouge-L
sandbox     generated code in namespaces with limits; `python -m qwen.evaluation.sandbox` scores sample files
results     sample JSONL (resume), summary JSON, table, chart
tasks       one class per benchmark script: data, prompts, scoring, both scores
runner      what every script does the same way (flags, resume, progress, summary), `main(name, argv)`
"""
