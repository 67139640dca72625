"""Quality benchmark: does ARIA help unseen and rare concepts, and cost nothing when there is nothing to find?

A miniature of distillation with Random Conditioning (a tiny text-conditioned UNet teacher, a student with its
text pathway re-initialised, output KD) in which ARIA gets no help from the design:

* **Prompts** from the project's generated pool (`builtin_prompt_records(..., with_parts=True)`): each prompt
  depicts a subject of a group ("animals"/"fox") with a setting and a style. A *class* is a (group, subject) pair.
* **Label-driven latents**: a prompt's clean latent is the normalised sum of random 4x8x8 patterns of its
  group (weight 1), subject (1), setting (0.5) and style (0.3), as real images depend on what they depict.
  Nothing depends on MiniLM coordinates.
* **Designs** (`--design`), each with *instances* that also fix the latent patterns, the teacher's training seed
  and the student's initialisation:
  - `small` (formerly v3): 3 unseen classes (no paired data; 70% of their prompts held out, the rest in the pool)
    and 3 rare classes (4 pool prompts, also paired) among the classes with >= 12 prompts; 20% of every other
    class held out. The hard concepts are a few prompts each, smaller than any K=64 region.
  - `concept`: one whole topic group unseen (a coherent concept of 6-10% of the corpus, drawn per instance
    among the groups of that size; 70% held out), and 3 rare classes as in `small`.
  - the all-seen control (`--control_seeds`): every class seen, nothing to find.
* **Swap schedules** (`--schedules`): `constant` (p = 0.5) and `exponential` (Random Conditioning's
  p(t) = exp(-5 (1 - t/T)), the training script's default: most swaps at large t). Every cell runs both.
* **Regions built by the library as a user would**: `build_regions` over the pool with its defaults (about 4
  prompts a region, a power of 2, and the region tree), seeded per instance. Their purity with respect to the
  groups is reported. The "aligned" row (ARIA whose regions are the label classes) is an upper bound, never
  the headline.
* **References**: `mix:u=..,r=..`, a fixed mixture of swaps over the unseen / rare / seen *label groups*
  (size-proportional within a group; it knows the labels), frozen by the rule of docs/benchmarks-quality.md.
  `aria_true`: ARIA's own rule fed every 50 steps with the student's *true* per-region held-out relative
  excess instead of tracker estimates (the best that the rule can do with these regions).
* **Metrics** at every length in `--eval_steps` of one run (constant learning rate): held-out normalised
  epsilon MSE of student vs teacher per group, overall on the evaluation mix and at natural weights (each
  class weighted by its share of the corpus), as paired ratios to RC (same paired batches, t, noise, swap
  coins and sampler uniforms; only the region probabilities differ); per policy also the share of swaps per
  group and the number of distinct pool prompts drawn (coverage).

    python benchmarks/quality_unseen_rare.py --quick                      # smoke, < 5 min
    python benchmarks/quality_unseen_rare.py --design small --instances 100 101 --seeds 0 --tag tuning ...
    python benchmarks/quality_unseen_rare.py --report benchmarks/results/quality_unseen_rare_TAG.json
    python benchmarks/quality_unseen_rare.py --pool RESULTS_A.json RESULTS_B.json   # seeds of two rounds as one

Writes benchmarks/results/quality_unseen_rare[_TAG].json and prints Markdown tables, then issue 25's targets
for the library default in every cell that ran (`verdict`: at 1,000 steps, small: unseen >= 40% of the
mixture's gain, rare <= 0.95, seen <= 1.01, natural overall <= 0.99; concept: >= 60%, natural overall <= 0.98;
all-seen control: natural overall within +-0.5% of RC). Exits 1 when one is missed (`--pool` too: the verdict
over the runs of every file it reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as _common does

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from diffusers_aria.allocation import AllocationPolicy, make_policy, policy_arguments  # noqa: E402
from diffusers_aria.callback import ARIACallback  # noqa: E402
from diffusers_aria.conditioning import feed_mask  # noqa: E402
from diffusers_aria.embedded.builtin_pool import builtin_prompt_records  # noqa: E402
from diffusers_aria.embedded.tiny_teacher import tiny_scheduler  # noqa: E402
from diffusers_aria.sampler import AdaptiveRegionSampler  # noqa: E402
from diffusers_aria.tracker import DiscrepancyTracker  # noqa: E402

from _common import header, loadavg, split_spec, table, tracker_keys, write_json  # noqa: E402
from _miniature import (  # noqa: E402
    LATENT_CHANNELS,
    TextStates,
    encode_prompts,
    fingerprint,
    make_student,
    train_or_load_teacher,
)

KINDS = ("seen", "unseen", "rare")
SCHEDULES = ("constant", "exponential")
DESIGNS = ("small", "concept")
CONCEPT_GROUP_SHARE = (0.06, 0.10)  # the `concept` design's unseen group: a topic group of this share of the corpus
BASE_POLICIES = ("rc", "region_uniform", "static", "doremi", "exp3", "aria")
TRACKER_KEYS = tracker_keys()
LATENT_WEIGHTS = {"group": 1.0, "subject": 1.0, "setting": 0.5, "style": 0.3}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ corpus and design
def load_corpus(n: int) -> dict:
    recs = builtin_prompt_records(n, seed=0, with_parts=True)
    out: dict[str, Any] = {"prompts": [r["prompt"] for r in recs]}
    for key in ("group", "subject", "setting", "style"):
        names = sorted({r[key] if key != "subject" else f"{r['group']}/{r['subject']}" for r in recs})
        idx = {v: i for i, v in enumerate(names)}
        out[key] = np.array([idx[r[key] if key != "subject" else f"{r['group']}/{r['subject']}"] for r in recs])
        out[key + "_names"] = names
    return out


def label_latents(corpus: dict, instance: int, size: int = 8) -> torch.Tensor:
    """Normalised sum of random patterns of the prompt's group, subject, setting and style (instance-seeded)."""
    g = torch.Generator().manual_seed(50_000 + instance)
    lat = torch.zeros((len(corpus["prompts"]), LATENT_CHANNELS, size, size))
    for key, w in LATENT_WEIGHTS.items():
        pats = torch.randn((len(corpus[key + "_names"]), LATENT_CHANNELS, size, size), generator=g)
        lat += w * pats[torch.as_tensor(corpus[key])]
    return lat / lat.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)


def make_design(corpus: dict, instance: int, args, control: bool = False) -> dict:
    """Which classes are seen / unseen / rare, the held-out split, the pool and the paired set."""
    rng = np.random.default_rng([instance, 31])
    cls = corpus["subject"]
    n_cls = len(corpus["subject_names"])
    sizes = np.bincount(cls, minlength=n_cls)
    kinds = np.array(["seen"] * n_cls, dtype=object)
    group_of_class = np.zeros(n_cls, dtype=np.int64)
    group_of_class[cls] = corpus["group"]
    unseen_group = None
    if not control:
        if args.design == "concept":
            share = np.bincount(corpus["group"], minlength=len(corpus["group_names"])) / len(cls)
            lo, hi = CONCEPT_GROUP_SHARE
            groups = [g for g in range(len(share)) if lo <= share[g] <= hi]
            unseen_group = int(groups[np.random.default_rng([instance, 37]).integers(len(groups))])
            kinds[group_of_class == unseen_group] = "unseen"
        eligible = [c for c in rng.permutation(n_cls) if sizes[c] >= args.min_class_size and kinds[c] == "seen"]
        num_unseen = 0 if args.design == "concept" else args.num_unseen
        for c in eligible[:num_unseen]:
            kinds[c] = "unseen"
        for c in eligible[num_unseen:num_unseen + args.num_rare]:
            kinds[c] = "rare"
    heldout, pool = [], []
    for c in range(n_cls):
        members = rng.permutation(np.flatnonzero(cls == c))
        frac = args.unseen_heldout_frac if kinds[c] == "unseen" else args.heldout_frac
        n_h = int(round(frac * len(members))) if len(members) >= 5 else 0
        heldout.extend(members[:n_h].tolist())
        rest = members[n_h:]
        if kinds[c] == "rare":
            rest = rest[:args.rare_size]
        pool.extend(rest.tolist())
    heldout, pool = np.sort(heldout), np.sort(pool)
    paired = np.array([i for i in pool if kinds[cls[i]] != "unseen"])
    return {"instance": instance, "kinds": kinds, "heldout": heldout, "pool": pool, "paired": paired,
            "class_sizes": sizes, "control": control,
            "unseen_group": None if unseen_group is None else corpus["group_names"][unseen_group]}


def library_regions(prompts: list[str], pool: np.ndarray, k: int | None, seed: int, cache_dir: str):
    """`build_regions` over the pool prompts with the library's defaults (K: `default_num_regions` unless `k`
    is given; the region tree), as the training script builds them (embeddings cached)."""
    from diffusers_aria.regions import build_regions

    return build_regions([prompts[i] for i in pool], num_regions=None if k is None else min(k, len(pool)),
                         seed=seed, method="sklearn", embeddings_cache_dir=os.path.join(cache_dir, "v3-embeddings"),
                         progress=False)


def region_purity(region_ids: np.ndarray, labels: np.ndarray) -> float:
    """Size-weighted share of each region's majority label."""
    total = 0
    for r in np.unique(region_ids):
        total += np.bincount(labels[region_ids == r]).max()
    return float(total / len(region_ids))


# ------------------------------------------------------------------------------------------ policies
class FixedMixture(AllocationPolicy):
    """A fixed share of swaps to the unseen and rare label groups (the rest to seen), size-proportional
    within a group; groups absent from the design give their share to the seen group."""

    name = "mix"

    def __init__(self, sizes, region_kind, u: float = 1 / 3, r: float = 1 / 3) -> None:
        self.region_kind, self.u, self.r = np.asarray(region_kind), float(u), float(r)
        super().__init__(sizes)

    def initial_probabilities(self) -> np.ndarray:
        share = {"unseen": self.u, "rare": self.r}
        share["seen"] = 1.0 - sum(v for k, v in share.items() if (self.region_kind == k).any())
        p = np.zeros(self.num_regions)
        for k in KINDS:
            m = self.region_kind == k
            if m.any():
                p[m] = self.sizes[m] / self.sizes[m].sum() * share[k]
        return p / p.sum()


class TrueErrorARIA(AllocationPolicy):
    """ARIA's rule (the library default) applied to true per-region held-out relative excess, set by the loop."""

    name = "aria_true"

    def __init__(self, sizes) -> None:
        super().__init__(sizes)
        self.rule = make_policy("aria", sizes)
        self.probabilities = self.rule.probabilities.copy()
        self.true_errors: np.ndarray | None = None

    def step(self, step: int, tracker) -> np.ndarray:
        if self.true_errors is None or tracker.num_updates < self.rule.warmup_steps:
            return self.probabilities
        e = self.true_errors
        seen = np.isfinite(e)
        excess = np.where(seen, e / np.average(e[seen], weights=self.sizes[seen]) - 1.0, 0.0)
        target = self.rule.target(excess)  # exact values: the excess itself
        p = self.probabilities + self.rule.damping * (target - self.probabilities)
        self.probabilities = p / p.sum()
        return self.probabilities


def parse_spec(spec: str) -> tuple[str, dict, dict, dict]:
    name, settings = split_spec(spec)
    pol, trk, run = {}, {}, {"regions": "library", "feed": "all"}
    for k, val in settings.items():
        (trk if k in TRACKER_KEYS else run if k in ("regions", "feed") else pol)[k] = val
    if name not in (*BASE_POLICIES, "mix", "aria_true"):
        raise SystemExit(f"unknown policy {name!r}")
    if name == "mix":
        run["regions"] = "classes"  # a group mixture acts on the label groups
    return name, pol, trk, run


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Fixed held-out (prompt, t, noise) triples; the teacher's eps is computed once."""

    def __init__(self, teacher, text, latents, prompts_idx, t_grid, seed: int = 777, batch: int = 512):
        self.text, self.batch = text, batch
        self.prompt = np.repeat(prompts_idx, len(t_grid))
        self.t = torch.as_tensor(np.tile(t_grid, len(prompts_idx)), dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        x0 = latents[torch.as_tensor(self.prompt)]
        self.x = tiny_scheduler().add_noise(x0, torch.randn(x0.shape, generator=g), self.t)
        self.t_eps = self._eps(teacher)
        self.den = (self.t_eps ** 2).flatten(1).sum(1).numpy()

    @torch.no_grad()
    def _eps(self, unet) -> torch.Tensor:
        was = unet.training
        unet.eval()
        out = [self.text(unet, self.x[s:s + self.batch], self.t[s:s + self.batch], self.prompt[s:s + self.batch])
               for s in range(0, len(self.prompt), self.batch)]
        unet.train(was)
        return torch.cat(out)

    def errors(self, student) -> np.ndarray:
        """Per-triple squared error numerators."""
        return ((self._eps(student) - self.t_eps) ** 2).flatten(1).sum(1).numpy()


def scores(num: np.ndarray, ev: Evaluator, design: dict, corpus: dict) -> dict:
    cls = corpus["subject"][ev.prompt]
    kind = design["kinds"][cls]
    out = {"overall_eval_mix": float(num.sum() / ev.den.sum())}
    for k in KINDS:
        m = kind == k
        out[k] = float(num[m].sum() / ev.den[m].sum()) if m.any() else float("nan")
    # natural weights: each class counts by its share of the corpus, whatever its held-out count
    w_cls = design["class_sizes"] / design["class_sizes"].sum()
    per_num = np.bincount(cls, weights=num, minlength=len(w_cls))
    per_den = np.bincount(cls, weights=ev.den, minlength=len(w_cls))
    has = per_den > 0
    out["overall_natural"] = float((w_cls[has] * per_num[has] / per_den[has]).sum() / w_cls[has].sum())
    return out


# ------------------------------------------------------------------------------------------ one run
def swap_probability(schedule: str, t: torch.Tensor, args) -> torch.Tensor:
    """p(t) of a swap: constant `--swap_p`, or Random Conditioning's exp(-5 (1 - t/T))."""
    if schedule == "constant":
        return torch.full(t.shape, float(args.swap_p))
    return torch.exp(-5.0 * (1.0 - t.double() / 1000.0)).float()


def run_one(spec: str, seed: int, ctx: dict, args, schedule: str = "constant") -> dict:
    name, pol_kw, trk_kw, run_kw = parse_spec(spec)
    design, corpus, text, latents, teacher = ctx["design"], ctx["corpus"], ctx["text"], ctx["latents"], ctx["teacher"]
    pool, paired = design["pool"], design["paired"]
    cls = corpus["subject"]
    if run_kw["regions"] == "classes":
        reg = np.unique(cls[pool], return_inverse=True)[1].astype(np.int64)
    else:
        reg = ctx["region_ids"]
    K = int(reg.max()) + 1
    sizes = np.bincount(reg, minlength=K)
    region_kind = np.array([design["kinds"][np.bincount(cls[pool[reg == k]]).argmax()] for k in range(K)], dtype=object)
    if name == "mix":
        policy: AllocationPolicy = FixedMixture(sizes, region_kind, **pol_kw)
    elif name == "aria_true":
        policy = TrueErrorARIA(sizes)
    else:
        tree = ctx["tree"] if run_kw["regions"] == "library" and "tree" in policy_arguments(name) else None
        policy = make_policy(name, sizes, **pol_kw, **({"tree": tree} if tree is not None and "tree" not in pol_kw else {}))
    tracker = DiscrepancyTracker(K, **trk_kw)
    sampler = AdaptiveRegionSampler(reg, seed=seed)
    cb = ARIACallback(None, sampler, tracker, policy, log_every=0, register_hooks=False)
    prior0 = sampler.probabilities.copy()  # the policy's starting allocation
    student = make_student(teacher, None, "text_kv")
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    import copy

    scored = copy.deepcopy(student).requires_grad_(False)
    params, ema_params = list(student.parameters()), list(scored.parameters())
    scheduler = tiny_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    B, pool_t, paired_t = args.batch, torch.as_tensor(pool), torch.as_tensor(paired)
    kind_of = design["kinds"][cls]
    swaps = {k: 0 for k in KINDS}
    drawn_sets: dict[str, set] = {k: set() for k in KINDS}
    # aria_true: held-out prompts mapped to the sampler's regions (nearest centroid / own class)
    true_ev, true_reg = ctx.get("true_eval"), None
    if name == "aria_true":
        true_reg = (np.searchsorted(np.unique(cls[pool]), cls[true_ev.prompt]) if run_kw["regions"] == "classes"
                    else ctx["heldout_regions_per_triple"])
    evals, t0 = {}, time.time()
    steps = max(args.eval_steps)
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7919 * design["instance"])  # shared by policies
        pi = paired_t[torch.randint(0, len(paired), (B,), generator=g)]
        t = torch.randint(0, 1000, (B,), generator=g)
        x0 = latents[pi] + args.target_noise * torch.randn((B,) + tuple(latents.shape[1:]), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        coins = torch.rand(B, generator=g) < swap_probability(schedule, t, args)
        x = scheduler.add_noise(x0, noise, t)
        drawn, _ = sampler.draw(step, B)
        cond = torch.where(coins, pool_t[torch.as_tensor(drawn)], pi)
        with torch.no_grad():
            e_t = text(teacher, x, t, cond)
        e_s = text(student, x, t, cond)
        per = ((e_s - e_t) ** 2).flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        per.mean().backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - args.eval_ema)
        c, sw = cond.numpy(), coins.numpy()
        for i in c[sw]:
            k = kind_of[i]
            swaps[k] += 1
            drawn_sets[k].add(int(i))
        region_of_sample = np.full(B, -1)
        pos = np.searchsorted(pool, c)
        in_pool = (pos < len(pool)) & (pool[np.minimum(pos, len(pool) - 1)] == c)
        region_of_sample[in_pool] = reg[pos[in_pool]]
        mask = feed_mask(run_kw["feed"], coins, t, alphas_cumprod)
        cb.on_step_end(step, torch.as_tensor(region_of_sample), per.detach(), t, mask)
        if name == "aria_true" and (step + 1) % args.true_every == 0:
            num = true_ev.errors(scored)
            e = np.bincount(true_reg, weights=num, minlength=K) / np.maximum(
                np.bincount(true_reg, weights=true_ev.den, minlength=K), 1e-12)
            seen_r = np.bincount(true_reg, minlength=K) > 0
            policy.true_errors = np.where(seen_r, e, np.nan)
        if step + 1 in args.eval_steps:
            res = scores(ctx["eval"].errors(scored), ctx["eval"], design, corpus)
            total = max(sum(swaps.values()), 1)
            res["swap_share"] = {k: swaps[k] / total for k in KINDS}
            res["distinct_drawn"] = {k: len(drawn_sets[k]) for k in KINDS}
            res["max_p_over_prior"] = float((sampler.probabilities / prior0).max())
            evals[str(step + 1)] = res
    return {"policy": spec, "seed": seed, "instance": design["instance"], "schedule": schedule, "evals": evals,
            "seconds": time.time() - t0, "num_regions": K}


# ------------------------------------------------------------------------------------------ instances
def prepare_instance(instance: int, args, control: bool = False) -> dict:
    """Design, latents, teacher (trained once, cached), regions (cached) and evaluators of one instance."""
    corpus = load_corpus(args.pool_size)
    tok, emb = encode_prompts(corpus["prompts"], args.cache_dir)
    text = TextStates(tok, torch.from_numpy(emb))
    latents = label_latents(corpus, instance)
    teacher, tinfo = train_or_load_teacher(args.cache_dir, text, latents, fingerprint(corpus["prompts"]) + f"-v3-{instance}",
                                           steps=args.teacher_steps, seed=instance, log=lambda m: None)
    design = make_design(corpus, instance, args, control=control)
    regions = library_regions(corpus["prompts"], design["pool"], args.num_regions, 1000 + instance, args.cache_dir)
    ev = Evaluator(teacher, text, latents, design["heldout"], args.eval_t)
    ctx = {"design": design, "corpus": corpus, "text": text, "latents": latents, "teacher": teacher, "eval": ev,
           "region_ids": np.asarray(regions.region_ids, dtype=np.int64), "tree": regions.tree, "teacher_info": tinfo}
    # aria_true's held-out set: every held-out prompt at 3 timesteps, mapped to the library regions
    true_ev = Evaluator(teacher, text, latents, design["heldout"], [150, 450, 750], seed=778)
    ctx["true_eval"] = true_ev
    held_reg = np.asarray(regions.assign([corpus["prompts"][i] for i in design["heldout"]]), dtype=np.int64)
    ctx["heldout_regions_per_triple"] = np.repeat(held_reg, 3)
    kinds_pool = design["kinds"][corpus["subject"][design["pool"]]]
    kind_ids = np.array([KINDS.index(k) for k in kinds_pool])
    ctx["purity"] = {"kind": region_purity(ctx["region_ids"], kind_ids),
                     "class": region_purity(ctx["region_ids"], corpus["subject"][design["pool"]]),
                     "unseen_in_unseen_majority_regions": _minority_share(ctx["region_ids"], kind_ids, 1),
                     "rare_in_rare_majority_regions": _minority_share(ctx["region_ids"], kind_ids, 2)}
    return ctx


def _minority_share(region_ids, kind_ids, kind) -> float | None:
    m = kind_ids == kind
    if not m.any():
        return None
    major = {r: np.bincount(kind_ids[region_ids == r], minlength=3).argmax() for r in np.unique(region_ids)}
    return float(np.mean([major[r] == kind for r in region_ids[m]]))


def _part_path(args, instance: int, seed: int, control: bool, schedule: str) -> str:
    kind = "control" if control else args.design
    return os.path.join(args.parts_dir, f"{kind}_{schedule}_i{instance}_s{seed}.json")


def _worker(job) -> list[dict]:
    """All policies of one (instance, seed, schedule), written to its part file as each finishes (a rerun with
    the same tag resumes: finished (policy, instance, seed, schedule) runs with the same settings are not run
    again)."""
    instance, seed, specs, args, control, schedule = job
    torch.set_num_threads(1)
    path = _part_path(args, instance, seed, control, schedule)
    key = _settings_key(args)
    done = {}
    if os.path.exists(path):
        with open(path) as fh:
            part = json.load(fh)
        if part.get("settings") == key:
            done = {r["policy"]: r for r in part["runs"]}
    out = [done[s] for s in specs if s in done]
    todo = [s for s in specs if s not in done]
    if not todo:
        return out
    ctx = prepare_instance(instance, args, control)
    for spec in todo:
        r = run_one(spec, seed, ctx, args, schedule)
        r["control"] = control
        out.append(r)
        log(f"  {schedule} instance {instance} seed {seed} {spec}: {r['seconds']:.0f}s "
            + " ".join(f"{k}={r['evals'][str(max(args.eval_steps))][k]:.4f}" for k in ("seen", "unseen", "rare")))
        tmp = path + f".tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"settings": key, "runs": out}, fh)
        os.replace(tmp, path)
    return out


def _settings_key(args) -> dict:
    """Every setting a run's numbers depend on (not which policies, instances or seeds are asked for)."""
    skip = {"policies", "instances", "seeds", "control_seeds", "control_policies", "workers", "cache_dir", "out_dir",
            "tag", "parts_dir", "quick", "schedules"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


def _teacher_job(job) -> dict:
    instance, args, control = job
    torch.set_num_threads(1)
    ctx = prepare_instance(instance, args, control)
    d = ctx["design"]
    from _miniature import text_sensitivity, weights_digest

    sens = text_sensitivity(ctx["teacher"], ctx["text"], ctx["latents"], [100, 500, 900], num_pairs=64)
    return {"instance": instance, "control": control, "purity": ctx["purity"],
            "teacher_digest": weights_digest(ctx["teacher"]),
            "teacher_text_sensitivity": {str(t): v for t, v in sens.items()},
            "teacher_cached": ctx["teacher_info"].cached, "teacher_seconds": ctx["teacher_info"].train_seconds,
            "num_heldout": int(len(d["heldout"])), "num_pool": int(len(d["pool"])),
            "num_paired": int(len(d["paired"])), "unseen_group": d["unseen_group"],
            "num_regions": int(ctx["region_ids"].max()) + 1,
            "tree_levels": None if ctx["tree"] is None else ctx["tree"].level_sizes(),
            "unseen_classes": [ctx["corpus"]["subject_names"][c] for c in np.flatnonzero(d["kinds"] == "unseen")],
            "rare_classes": [ctx["corpus"]["subject_names"][c] for c in np.flatnonzero(d["kinds"] == "rare")]}


# ------------------------------------------------------------------------------------------ summary
METRICS = ("unseen", "rare", "seen", "overall_natural", "overall_eval_mix")


def _nanmean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def _nansd(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


def summarise(runs: list[dict], length: str) -> dict:
    """Paired ratios to RC per (instance, seed); per instance the mean over seeds; pooled over instances."""
    rc = {(r["instance"], r["seed"]): r["evals"][length] for r in runs if r["policy"] == "rc" and length in r["evals"]}
    out: dict[str, Any] = {}
    for spec in dict.fromkeys(r["policy"] for r in runs):
        per_inst: dict[int, dict[str, list]] = {}
        for r in runs:
            if r["policy"] != spec or length not in r["evals"] or (r["instance"], r["seed"]) not in rc:
                continue
            base = rc[(r["instance"], r["seed"])]
            d = per_inst.setdefault(r["instance"], {m: [] for m in (*METRICS, "share_unseen", "share_rare",
                                                                    "distinct_unseen", "distinct_rare")})
            for m in METRICS:
                d[m].append(r["evals"][length][m] / base[m])
            d["share_unseen"].append(r["evals"][length]["swap_share"]["unseen"])
            d["share_rare"].append(r["evals"][length]["swap_share"]["rare"])
            d["distinct_unseen"].append(r["evals"][length]["distinct_drawn"]["unseen"])
            d["distinct_rare"].append(r["evals"][length]["distinct_drawn"]["rare"])
        inst_means = {i: {m: _nanmean(v) for m, v in d.items()} for i, d in per_inst.items()}
        pooled = {}
        for m in (*METRICS, "share_unseen", "share_rare", "distinct_unseen", "distinct_rare"):
            vals = [v[m] for v in inst_means.values()]
            pooled[m] = {"mean": _nanmean(vals), "sd_instances": _nansd(vals)}
        out[spec] = {"per_instance": inst_means, "pooled": pooled}
    return out


def summaries(runs: list[dict], lengths) -> dict:
    """{schedule: {length: summarise(...)}} over the schedules the runs hold."""
    out = {}
    for schedule in SCHEDULES:
        sub = [r for r in runs if r.get("schedule", "constant") == schedule]
        if sub:
            out[schedule] = {str(L): summarise(sub, str(L)) for L in lengths}
    return out


def format_tables(results: dict) -> str:
    lines = []
    for schedule, by_length in results["summary"].items():
        lines.append(f"\n### swap schedule: {schedule}\n")
        lines.append(_format_schedule(by_length))
    return "\n".join(lines)


def _format_schedule(by_length: dict) -> str:
    lines = []
    for length, summ in by_length.items():
        lines.append(f"\n#### {length} steps (paired ratio to RC; mean over instances ± sd across instances)\n")
        rows = []
        for spec, s in summ.items():
            p = s["pooled"]
            rows.append([spec] + [f"{p[m]['mean']:.3f} ± {p[m]['sd_instances']:.3f}" for m in METRICS]
                        + [f"{p['share_unseen']['mean']:.2f}/{p['share_rare']['mean']:.2f}",
                           f"{p['distinct_unseen']['mean']:.0f}/{p['distinct_rare']['mean']:.0f}"])
        lines.append(table(rows, ["policy", "unseen", "rare", "seen", "overall (natural)", "overall (eval mix)",
                                  "swap share unseen/rare", "distinct drawn unseen/rare"]))
        insts = sorted({i for v in summ.values() for i in v["per_instance"]}, key=int)
        if len(insts) > 1:
            lines.append(f"\nPer instance (mean over seeds), unseen / rare ratio to RC, {length} steps:\n")
            rows = [[spec] + [(f"{v['per_instance'][i]['unseen']:.3f} / {v['per_instance'][i]['rare']:.3f}"
                               if i in v["per_instance"] else "-") for i in insts] for spec, v in summ.items()]
            lines.append(table(rows, ["policy"] + [f"instance {i}" for i in insts]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ targets (issue 25)
REFERENCE = "mix:u=0.33,r=0.17"  # the label-aware mixture, frozen on the tuning instances
TARGETS = {  # at TARGET_LENGTH steps, per swap schedule: (metric, "min" or "max", limit)
    "small": [("unseen_share_of_reference_gain", "min", 0.40), ("rare", "max", 0.95), ("seen", "max", 1.01),
              ("overall_natural", "max", 0.99)],
    "concept": [("unseen_share_of_reference_gain", "min", 0.60), ("overall_natural", "max", 0.98)],
}
CONTROL_TOLERANCE = 0.005  # the all-seen control: natural-weight overall within +-0.5% of RC
TARGET_LENGTH = "1000"


def verdict(results: dict, design: str, policy: str = "aria", reference: str = REFERENCE) -> list[dict]:
    """Issue 25's targets for `policy` in every cell the results hold (a cell without the policy, the reference
    or the target length is not judged). One row per criterion: value, limit, met."""
    rows = []
    for schedule, by_length in (results.get("summary") or {}).items():
        summ = by_length.get(TARGET_LENGTH, {})
        if policy not in summ:
            continue
        pooled = summ[policy]["pooled"]
        for metric, kind, limit in TARGETS.get(design, []):
            if metric == "unseen_share_of_reference_gain":
                if reference not in summ:
                    continue
                ref = summ[reference]["pooled"]["unseen"]["mean"]
                value = (1.0 - pooled["unseen"]["mean"]) / (1.0 - ref) if ref < 1.0 else float("nan")
            else:
                value = pooled[metric]["mean"]
            met = bool(value >= limit) if kind == "min" else bool(value <= limit)
            rows.append({"cell": f"{design}, {schedule}", "metric": metric, "kind": kind, "limit": limit,
                         "value": float(value), "met": met})
    for schedule, by_length in (results.get("control_summary") or {}).items():
        summ = by_length.get(TARGET_LENGTH, {})
        if policy in summ:
            value = summ[policy]["pooled"]["overall_natural"]["mean"]
            rows.append({"cell": f"control, {schedule}", "metric": "overall_natural", "kind": "within",
                         "limit": CONTROL_TOLERANCE, "value": float(value),
                         "met": bool(abs(value - 1.0) <= CONTROL_TOLERANCE)})
    return rows


def format_verdict(rows: list[dict]) -> str:
    if not rows:
        return ""
    sign = {"min": ">=", "max": "<=", "within": "1 +-"}
    body = [[r["cell"], r["metric"], f"{sign[r['kind']]} {r['limit']:g}", f"{r['value']:.3f}",
             "yes" if r["met"] else "**no**"] for r in rows]
    return f"\n### targets at {TARGET_LENGTH} steps (ARIA, the library default)\n\n" + table(
        body, ["cell", "metric", "target", "measured", "met"])


def _design_of_parts(parts_dir: str) -> str:
    import glob

    names = [os.path.basename(p).split("_")[0] for p in glob.glob(os.path.join(parts_dir, "*.json"))]
    return next((n for n in names if n in DESIGNS), "small")


def report_parts(parts_dir: str) -> dict:
    """Tables from the part files of a run that has not finished (every complete (instance, seed) so far)."""
    import glob

    groups = []
    for path in sorted(glob.glob(os.path.join(parts_dir, "*.json"))):
        with open(path) as fh:
            groups.append(json.load(fh)["runs"])
    # only complete (instance, seed) parts: every policy that any part of the same kind has finished
    runs = []
    for control in (False, True):
        same = [g for g in groups if g and bool(g[0].get("control")) == control]
        full = max((len(g) for g in same), default=0)
        runs.extend(r for g in same if len(g) == full for r in g)
    out = report_runs(runs, _design_of_parts(parts_dir), parts_dir=parts_dir, instances_seeds=sorted(
        {(r["instance"], r["seed"]) for r in runs if not r.get("control")}))
    print(f"{len(runs)} runs from {parts_dir}; (instance, seed): {out['instances_seeds']}")
    print(out["report"])
    return out


def report_runs(runs: list[dict], design: str, **extra) -> dict:
    """The tables and the verdict of finished runs (main and control), as `main` prints them; `extra` goes first
    into the returned dict."""
    main_runs = [r for r in runs if not r.get("control")]
    ctrl_runs = [r for r in runs if r.get("control")]
    lengths = sorted({L for r in runs for L in r["evals"]}, key=int)
    out = {**extra, "num_runs": len(runs), "summary": summaries(main_runs, lengths),
           "control_summary": summaries(ctrl_runs, lengths) if ctrl_runs else None}
    out["verdict"] = verdict(out, design)
    text = format_tables(out)
    if ctrl_runs:
        text += "\n\n### all-seen control\n" + format_tables({"summary": out["control_summary"]})
    out["report"] = text + format_verdict(out["verdict"])
    return out


POOL_FREE_ARGS = ("seeds", "control_seeds", "policies", "control_policies", "instances", "eval_steps", "workers",
                  "tag")  # what may differ between the invocations pooled by --pool


def pool_results(paths: list[str]) -> dict:
    """The runs of several invocations read as one (e.g. control seeds run in two rounds): the same design and
    settings (every argument but those of POOL_FREE_ARGS), no run twice; the tables and the verdict over them all."""
    if not paths:
        raise SystemExit("--pool needs one or more results files of quality_unseen_rare.py")
    files = []
    for path in paths:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--pool: cannot read {path!r} as a results file ({err})") from None
        if not isinstance(data, dict) or "runs" not in data or "args" not in data:
            raise SystemExit(f"--pool: {path!r} is not a results file of quality_unseen_rare.py (no 'runs' and 'args')")
        files.append((path, data))
    first_path, first = files[0]
    settings = {k: v for k, v in first["args"].items() if k not in POOL_FREE_ARGS}
    seen: dict[tuple, str] = {}
    runs = []
    for path, data in files:
        for k in sorted(set(settings) | set(data["args"]) - set(POOL_FREE_ARGS)):
            if data["args"].get(k) != settings.get(k):
                raise SystemExit(f"--pool: {path!r} was run with {k}={data['args'].get(k)!r} but {first_path!r} with "
                                 f"{k}={settings.get(k)!r}; only {', '.join(POOL_FREE_ARGS)} may differ")
        for r in data["runs"]:
            key = (r["policy"], r["instance"], r["seed"], r.get("schedule", "constant"), bool(r.get("control")))
            if key in seen:
                raise SystemExit(f"--pool: the run {key} (policy, instance, seed, schedule, control) is in both "
                                 f"{seen[key]!r} and {path!r}")
            seen[key] = path
            runs.append(r)
    seeds: dict[str, dict[str, set]] = {}  # {"main" | "control": {policy: seeds}}
    for r in runs:
        seeds.setdefault("control" if r.get("control") else "main", {}).setdefault(r["policy"], set()).add(r["seed"])
    out = report_runs(runs, settings.get("design", "small"), pooled_files=[p for p, _ in files],
                      seeds={kind: {spec: sorted(s) for spec, s in by.items()} for kind, by in seeds.items()},
                      teachers_differ=_teachers_differ(files))
    print(f"{len(runs)} runs pooled from {len(files)} files; seeds per policy: {out['seeds']}")
    for inst, by_file in out["teachers_differ"].items():
        print(f"NOTE: instance {inst}: the files' runs come from {len(set(by_file.values()))} different teachers "
              f"({', '.join(f'{os.path.basename(p)}: {t}' for p, t in by_file.items())}); the same seed does not "
              "give the same run in both, so read the pooled seeds as seeds of one instance, not as one experiment")
    print(out["report"])
    return out


def _teacher_identity(record: dict) -> str | None:
    """A teacher's identity in a results file's `instances` record: its weights digest, or (files written before
    the digest was recorded) its text sensitivities, which differ in their last digits when the weights do."""
    if record.get("teacher_digest"):
        return str(record["teacher_digest"])
    sens = record.get("teacher_text_sensitivity")
    return "text sensitivity " + "/".join(f"{sens[t]:.9g}" for t in sorted(sens, key=int)) if sens else None


def _teachers_differ(files: list[tuple[str, dict]]) -> dict[str, dict[str, str]]:
    """{instance label: {file: teacher identity}} for the instances whose files record different teachers."""
    seen: dict[str, dict[str, str]] = {}
    for path, data in files:
        for rec in data.get("instances") or []:
            ident = _teacher_identity(rec)
            if ident is not None:
                label = f"{rec['instance']}{' (control)' if rec.get('control') else ''}"
                seen.setdefault(label, {})[path] = ident
    return {label: by for label, by in seen.items() if len(set(by.values())) > 1}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="< 5 minutes: one instance, few steps (smoke)")
    ap.add_argument("--instances", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="training seeds (none: control only)")
    ap.add_argument("--policies", nargs="+", default=None,
                    help="specs: rc region_uniform static doremi exp3 aria, mix:u=..,r=.., aria_true, "
                         "aria:regions=classes (aligned upper bound), aria:tau=..., ...")
    ap.add_argument("--control_seeds", nargs="+", type=int, default=[],
                    help="seeds of the all-seen control (instance = the first of --instances)")
    ap.add_argument("--control_policies", nargs="+", default=["rc", "aria"])
    ap.add_argument("--eval_steps", nargs="+", type=int, default=[300, 1000])
    ap.add_argument("--pool_size", type=int, default=3000)
    ap.add_argument("--design", choices=DESIGNS, default="small", help="small unseen classes, or one unseen concept")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES), help="swap schedules to run")
    ap.add_argument("--num_regions", type=int, default=None,
                    help="K of the library regions (default: the library's, `default_num_regions`)")
    ap.add_argument("--num_unseen", type=int, default=3)
    ap.add_argument("--num_rare", type=int, default=3)
    ap.add_argument("--rare_size", type=int, default=4)
    ap.add_argument("--min_class_size", type=int, default=12)
    ap.add_argument("--heldout_frac", type=float, default=0.2)
    ap.add_argument("--unseen_heldout_frac", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--swap_p", type=float, default=0.5)
    ap.add_argument("--target_noise", type=float, default=0.05)
    ap.add_argument("--eval_ema", type=float, default=0.98)
    ap.add_argument("--eval_t", nargs="+", type=int, default=[50, 250, 450, 650, 850])
    ap.add_argument("--true_every", type=int, default=50)
    ap.add_argument("--teacher_steps", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache_dir", default=os.path.join(HERE, "results", "cache"))
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.quick:
        args.instances, args.seeds = args.instances[:1], args.seeds[:1]
        args.pool_size, args.num_regions, args.teacher_steps = 1200, 64, 300
        args.eval_steps, args.true_every = [60, 120], 30
        args.control_seeds = args.control_seeds[:1]
        if args.policies is None:
            args.policies = ["rc", "aria", "mix:u=0.33,r=0.17", "aria_true"]
    if args.policies is None:
        args.policies = list(BASE_POLICIES)
    if "rc" not in args.policies:
        args.policies = ["rc"] + args.policies  # every ratio is paired to RC
    args.eval_steps = sorted(set(args.eval_steps))
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--report"]:
        text = "\n".join(format_tables(json.load(open(p))) for p in argv[1:])
        print(text)
        return {"report": text}
    if argv[:1] == ["--report_parts"]:  # the runs finished so far of an interrupted (resumable) run
        return report_parts(argv[1])
    if argv[:1] == ["--pool"]:  # several invocations' runs as one (seeds run in separate rounds)
        return pool_results(argv[1:])
    args = parse_args(argv)
    os.makedirs(args.cache_dir, exist_ok=True)
    name = "quality_unseen_rare" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    args.parts_dir = os.path.join(args.out_dir or os.path.join(HERE, "results"), name + "_parts")
    os.makedirs(args.parts_dir, exist_ok=True)
    meta = header(argv, "quality_unseen_rare.py")
    t0 = time.time()
    encode_prompts(load_corpus(args.pool_size)["prompts"], args.cache_dir)  # once, before the workers read it
    jobs_t = [(i, args, False) for i in args.instances if args.seeds]
    jobs_t += [(args.instances[0], args, True)] if args.control_seeds else []
    with ProcessPoolExecutor(max(1, args.workers)) as ex:  # teachers and regions, once per instance (cached)
        instances = list(ex.map(_teacher_job, jobs_t))
    for inst in instances:
        log(f"instance {inst['instance']}{' (control)' if inst['control'] else ''}: unseen {inst['unseen_classes']}, "
            f"rare {inst['rare_classes']}; region purity {inst['purity']}")
    jobs = [(i, s, args.policies, args, False, sch) for sch in args.schedules for i in args.instances for s in args.seeds]
    jobs += [(args.instances[0], s, args.control_policies, args, True, sch)
             for sch in args.schedules for s in args.control_seeds]
    with ProcessPoolExecutor(max(1, args.workers)) as ex:
        runs = [r for rs in ex.map(_worker, jobs) for r in rs]
    main_runs = [r for r in runs if not r["control"]]
    ctrl_runs = [r for r in runs if r["control"]]
    results = {**meta, "args": {k: v for k, v in vars(args).items() if k not in ("cache_dir", "out_dir", "parts_dir")},
               "instances": instances, "runs": runs,
               "summary": summaries(main_runs, args.eval_steps),
               "control_summary": summaries(ctrl_runs, args.eval_steps) if ctrl_runs else None,
               "seconds": time.time() - t0, "loadavg_end": loadavg()}
    results["verdict"] = verdict(results, args.design)
    text = format_tables(results)
    if ctrl_runs:
        text += "\n\n### all-seen control\n" + format_tables({"summary": results["control_summary"]})
    text += format_verdict(results["verdict"])
    print(text)
    path = write_json(name, results, args.out_dir)
    log(f"{len(runs)} runs in {results['seconds']:.0f} s; wrote {os.path.relpath(path)}")
    return results


if __name__ == "__main__":  # exit 1 when the library default misses a target in a cell it ran
    sys.exit(1 if any(not row["met"] for row in main().get("verdict", [])) else 0)
