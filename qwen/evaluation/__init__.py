"""What the eval/evaluate_*.py scripts share (see eval/EVALUATION.md).

data        the benchmarks' files in their download layouts, subject/category tables
prompts     the original scripts' prompts (few-shot and chat), choice tokens
scoring     batched multiple-choice log-likelihood (shared few-shot prefix, left padding + attention mask)
generation  batched greedy generation through qwen.engine, with stop strings
extract     answers out of model text (GSM8K numbers, chat letters, HumanEval bodies, ReAct calls), Rouge-L
sandbox     generated code in a limited subprocess
results     sample JSONL (resume), summary JSON, table, chart
tasks       the benchmarks and the runner behind every script
"""
