"""EconoServe: decoupled prompt and generation queues, time-synced exact allocation, KVCPipe,
a global reserve for mispredictions, and SLO/occupancy ordering.

Shen and Sen, "EconoServe: Maximizing Multi-Resource Utilization with SLO Guarantees in LLM
Serving", arXiv 2411.06364. Only the abstract is public; the rules below are the reconstruction
of ``PAPER.md`` ("Reconstruction: EconoServe", points 1-9), every knob in
:class:`EconoServeConfig`.

**Queues** (point 1). A request is first a *prompt task* (PT) in the PT queue. Admitted, it holds
KV for its prompt and gets prompt chunks each step; when its prompt is done (its first token is
sampled) it becomes a *generation task* (GT) in the GT queue, still holding its prompt's KV, until
a time-synced admission gives it an exact allocation and it generates one token per step.

**Exact allocation** (point 2). A GT's allocation covers ``prompt + A - 1`` tokens (the last
sampled token is never cached), where ``A = rl_bucket * ceil(P * (1 + rl_padding) / rl_bucket)``
for the predicted response length ``P``: the padded prediction rounded up to its bucket. A GT that
has outgrown its prediction (after a preemption) is given ``generated + rl_bucket``. Without a
prediction the allocation is the model's context (Orca's rule).

**Steps** (point 3). Every step runs every generating GT (one token each) and fills the rest of
the token budget with prompt tokens, longest-waiting first within the PT order, chunking long
prompts. The token budget is ``token_budget`` or, by default, the engine's saturating token
budget (the smallest step size past which the latency model's prefill throughput rises by less
than a few percent, :func:`econoserve.sim.latency.saturating_token_budget`). *Prefill cap*
(``prefill_decode_steps = k``): a step carries at most the prompt tokens whose prefill takes
``k`` isolated decode steps, ``k * T_d / T_p`` (``T_d`` = ``decode_time_per_step_s``, ``T_p`` =
``prefill_time_per_token_s`` of the engine), so prefill adds at most about ``k * T_d`` to every
generating request's time between tokens. Default ``k = 1.75``: 251-252 prompt tokens a step for
OPT-13B or Llama-2-13B on an A100-80GB (``T_d / T_p`` = 144), 317 on an A100-40GB (181), against
a token budget of 448. Where few requests decode (24-35 a step at 40 GB and on the Azure
conversation trace) a step is bound by reading the weights and the KV: part of a small prefill
hides under that read, and every decode stays fast; where about 100 decode (ShareGPT at 80 GB,
Gamma arrivals) or prompts are short and many (Alpaca), larger steps drain bursts of prompts
faster. Measured (full mode, 2000 requests, 2 seeds; ``benchmarks/results/policy_prefill_cap_full.md``),
goodput / Sarathi-Serve's (p99 JCT / Sarathi's) with ``k`` = 1.5 / 1.75 / 2, without a cap
(``None``, the default before) in brackets: ShareGPT 80 GB 1.10 / 1.12 / 1.11 (1.12), 40 GB
1.22 / 1.20 / 1.19 (1.18), Gamma CV 3 1.07 at each (1.07), Alpaca 1.11 (1.11), QMSum 1.14 / 1.16
/ 1.16 (1.17; p99 1.10 / 1.02 / 0.96x), Azure conv 1.15 / 1.13 / 1.12 (1.09; p99 0.99 / 1.05 /
1.14x against 1.24x), Azure code 2.12 / 2.15 / 2.17 (2.05; p99 1.20 / 1.20 / 1.16x against
1.23x). A cap on the whole step (decodes included) instead costs where many decode (at 256
tokens: 80 GB 1.10, Gamma 1.05, Alpaca 1.08; ``policy_budget_sweep_full.md``). Sarathi-Serve at a
256-token budget instead of its 512, against its own goodput: 80 GB 0.99, 40 GB 1.04, Gamma 0.93,
Azure conv 1.06. Two adaptive caps, tried and not kept (``policy_step_budget_notes.md``): only
while a PT waits for KV (Azure conv 1.09-1.10), and rising with the prompt backlog (Azure conv
1.10-1.12, 80 GB 1.08-1.11). The cost: prefill is slower, so under an SLO on the first token the
cap needs more GPUs where prompts arrive fast (notebook 05's TTFT + TPOT SLO: OPT-13B ShareGPT at
60 req/s 6 GPUs against DistServe's 8, 4 without the cap), and where prompts are long and the model
large (notebook 03's full profile, Llama-2-70B QMSum: goodput on the rate grid 1.48x vLLM's, 1.73x
without the cap).

**PT admission** (point 4). With KVCPipe for every request (``kvcpipe="all"``, the default) a
PT starts when KV for its prompt is free and the predicted occupancy curve (point 6) admits it.
In the other modes a PT starts when KV for its prompt is free, less the growth the GT
queue's head still needs for its exact allocation (so new prompts never starve a waiting GT);
``prompt_admission="lookahead"`` instead keeps free the exact allocations of every PT and queued
GT in the pipeline (fewer prompts in flight; KVCPipe then rarely has a queued GT to place). The
default ``prompt`` measured better (lower JCT and higher throughput) on KV-bound synthetic loads.

**Time-synced GT admission** (point 5). On an event (arrival, prompt done, request finished,
preemption), the GT queue is taken in priority order and split by predicted-RL bucket; buckets go
in the order of their best member, and each bucket's members are admitted together as one group
while their exact allocations fit in the free pool. Once a GT does not fit, lower-priority GTs
no longer take free blocks (no starvation of large GTs), but may still run by KVCPipe. Between
events the standing decision is repeated without running the admission logic, so the number of
invocations (``stats.invocations``) is far below the number of steps.

**KVCPipe** (point 6). *For every request* (``kvcpipe="all"``, the default): every request
in flight has a predicted occupancy term (:meth:`KVCache.occupancy_peak_blocks`): with ``A`` its
padded, bucketed prediction and ``g`` its tokens generated, it keeps what it holds, grows one
token a step for ``A - g`` steps from ``d`` steps from now, and then frees everything. ``d = 0``
for a GT (generating or queued); for a PT (``prefill_delay``) ``d = ceil((prompt tokens of the
PTs ahead of it in chunk order + its own) / (token budget - GTs))``, and it grows from its whole
prompt. A PT is admitted (in priority order, stopping at the first refused, so no request is
starved by smaller ones) iff the sum of the terms, its own included, peaks within its predicted
life at most at ``(num_blocks - global reserve) * (1 + overbooking)`` blocks. KV is allocated as
it is used (nothing reserved beyond the prompt), and a GT generates as soon as its prompt is done
(it was in the curve since its PT was admitted; GTs are still grouped by bucket). Growth takes
the free pool, then the global reserve; only then a GT is preempted (point 7): preemption is the
backstop of overbooking and of under-predictions, and KV is never over-committed. Measured
(``benchmarks/results/policy_regimes.md``): exact allocation left 15-17 % of the cache reserved
but unused at the strongest baseline's goodput rate on ShareGPT; this mode leaves about 1 %, as
Sarathi-Serve does, with no or few preemptions.

*Tail lending and the GT-only curve* (``kvcpipe="tail"`` / ``"curve"``). A generating host with ``R`` reserved (not yet used) blocks, ``B``
allocated blocks and ``c`` cached tokens can lend ``g <= R`` blocks to a guest GT whose growth
needs ``g`` blocks, if the guest's remaining padded generation ``A_guest - generated`` [steps]
is at most ``(B + R - g) * block_size - c``, the steps the host can run on its own remaining
space. The loan returns to the host when the guest finishes. Generalised (``kvcpipe="curve"``):
the head GT that fits neither the free pool nor a tail is admitted if the predicted
KV occupancy of all generating GTs and it (each holding ``max(held, cached)`` blocks until its
padded prediction runs out) stays within the cache less the global reserve at every future step;
it reserves what is free and takes the rest as it grows, from space the curve predicts will have
been freed. On synthetic and ShareGPT loads this raised throughput 3-5 % and cut mean JCT
4-6 % over tail lending alone. If a guest over-runs, the host
extends like a mispredicted GT and preempts its own guests before anyone else; a guest that
finds no space for its own growth preempts itself, never its host.

**Mispredictions** (point 7). A GT that outgrows its allocation takes blocks from the global
reserve (``reserve_ratio`` of the cache, withheld from every admission), then from the free pool;
only if both are empty is a GT preempted by recompute: the grower's guests first, then the
running GT with the lowest priority (largest key) and, on ties, the least progress, among those
preempted fewer than ``repeat_victim_limit = K`` times (all of them if none is). A preempted
request returns to the PT queue; it is never lost. Early finishers free their space at once.

*Repeat victims* (``repeat_victim_limit``, default 2). An under-predicted request outgrows its
allocation, and a larger allocation makes a larger key, so without the limit it is the victim
again after its recompute: on notebook 04's engine (Figure 15) the same requests were preempted
up to 8 times and made EconoServe's p99. Simulated on that engine's profile
(``benchmarks/results/policy_protect_notes.md``, eight traces of its regime) the limit cuts the
worst trace's p99 from 2.18x to 1.30x vLLM's at the rounds' load (0.77; the served trace 1.77x ->
1.35x) and the median over traces at load 1.06 from 1.52x to 1.26x; the medians at 0.77 and 0.9
move from 1.08x / 1.10x to 1.10x / 1.12x. On the scoreboard (ShareGPT 80 / 40 GB) preemptions are rare and it moves nothing
beyond the bisection: 1.13 / 1.27 -> 1.13 / 1.26 (p99 1.02 / 1.02x -> 1.02 / 1.01x). ``K = 1``
(every earlier victim spared while a fresh one exists) preempts twice as many requests and costs
40 GB a bisection step.

**Ordering** (point 8). With ``T_p`` = ``prefill_time_per_token_s`` and ``T_d`` =
``decode_time_per_step_s`` of the engine (:class:`~econoserve.policy.base.EngineLimits`), a
request's estimated isolated time is ``iso = prompt * T_p + A * T_d`` and its deadline
``arrival + slo_scale * iso``. The *PT key* is the latest start time that still meets the
deadline, ``deadline - remaining`` (remaining = pending prompt + padded generation, in seconds):
smallest first, i.e. least SLO slack first (slack = key - now, and ``now`` is common to all).
The *GT key* is that key minus ``gt_occupancy_weight * held_kv_tokens * T_d``: a GT holding
more KV goes earlier (it releases more KV sooner), weighted against its SLO slack. Keys do not
change while a request waits, so the queues stay sorted without re-scoring. Without Ordering
both queues are FCFS. Aging (``ordering_horizon_s = H``): the PT key is capped at
``arrival + H``, so a request is never passed by one that arrived more than ``H`` later. Late
demotion (``late_demotion_s = D``): a PT whose latest start by its SLO slack alone (the key
without the KV cost below) is more than ``D`` in the past (it can no longer meet its estimated
deadline) yields to the first PT that still can. Both are off by default: on the scoreboard
neither raised goodput (aging at 30 s cut the p99 JCT of true-length Ordering by 12 % on ShareGPT
at 80 GB but cost 2-8 % goodput at 40 GB; late demotion with ``D`` = 0 / 5 s, full mode: 80 GB
1.12 -> 1.11 / 1.12, Gamma CV 3 1.07 -> 1.07 / 1.07, ``benchmarks/results/policy_hopeless_a_full.md``:
the misses there are short answers whose decode alone takes most of their budget). Shrunk length
(``ordering_length_weight = w``): the keys use ``w * A`` output tokens instead of ``A``, i.e.
``key = arrival + (slo_scale - 1) * (prompt * T_p + w * A * T_d)`` for a PT not started (a
linear calibration ``c + w * A`` of the prediction; ``c`` cancels in the order). Default 1:
measured (``benchmarks/results/policy_ordering_weight*.md``, quick mode, ShareGPT, goodput /
Sarathi's at 80 / 40 GB) 1.03 / 1.07 with ``w = 1``, 1.01-1.03 / 1.04-1.06 with ``w`` 0.25-0.5
(trusting the ranking less loses), 1.03-1.04 / 1.06-1.07 with ``w`` 2-4 (within the 2 %
bisection step; in full mode ``w = 4`` equal goodput and p99 JCT 1.08x Sarathi's at 40 GB).
KV cost (``ordering_prompt_weight = u``): the slack keys count the prompt only by its prefill
time, which is small against a decode step, although the KV-time a request occupies grows with
its prompt (``L * (prompt + L / 2)`` token-steps for ``L`` output tokens). With ``u > 0`` the keys
use, instead of the output length ``L`` (after ``w`` and ``ordering_length``), its KV-time
equivalent ``L_kv = sqrt(L**2 + 2 * u * prompt * L)``, the output length of a prompt-less request
holding ``L * (u * prompt + L / 2)`` token-steps: ``key = arrival + (slo_scale - 1) * (prompt *
T_p + L_kv * T_d)`` for a PT not started, still static while it waits. Of two requests with the
same prediction the longer prompt goes later; ``u = 1`` counts the prompt's KV in full, a large
``u`` orders by ``prompt * L`` (plus arrival). Default 64 (0: slack alone). Measured (full mode,
2000 requests, 2 seeds; ``benchmarks/results/policy_kvcost_notes.md``), goodput / Sarathi's at 80
GB / 40 GB / Gamma CV 3 with the trained predictor: 1.01 / 1.09 / 1.03 at ``u = 0``, 1.05 / 1.12 /
1.06 at ``u = 4``, **1.07 / 1.19 / 1.06 at ``u = 64``**, 1.08 / 1.22 / 1.07 at ``u = 256`` (p99 JCT
0.99-1.04x Sarathi's at every ``u``); true lengths 1.17 / 1.17 / 1.14 at ``u = 0``, 1.22 / 1.21 /
1.16 at ``u = 4``, 1.19 / 1.31 / 1.12 at ``u = 64`` (p99 JCT 0.98 / 1.11 / 1.02x); beyond ShareGPT,
``u = 0`` -> 64 -> 256: Alpaca 1.06 -> 1.11 -> 1.11, QMSum 1.05 -> 1.17 -> 1.19, Azure conv (+-50 %
lengths) 1.05 -> 1.09 -> 1.12 (p99 JCT 1.18x -> 1.24x -> 1.27x), Azure code 1.28 -> 2.05 -> 2.07
(p99 1.15x -> 1.23x -> 1.24x). 64 takes nearly all of 256's gain with half the keys' spread (the
arrival time counts twice as much). With probes (lane 0.1) and refinement at ``k = 16``: 1.05 / 1.13 / 1.03
at ``u = 0``, 1.16 / 1.36 / 1.08 at ``u = 64`` (p99 JCT 1.04 / 1.17 / 1.04x). Short prompts are
served first (ShareGPT 80 GB: prompts of at most 64 tokens TTFT p90 14 s -> 0.3 s near the
goodput rate), long prompts wait longer. The trained predictor keeps gaining up to ``u`` in the
hundreds: it ranks long prompts short (Spearman of prediction vs prompt -0.70, truth -0.37), and a
large ``u`` trusts the prompt length over the prediction; a prompt-decoupled predictor
(``PredictorConfig.prompt_decoupling_folds``) adds nothing on top (1.09 / 1.21 / 1.07 at ``u =
64``).
Promotion (``ordering_promotion_wait_s = W``): KV-cost ordering passes long-prompt, long-prediction
requests; in a burst some are passed by hundreds of later arrivals (Azure conv, 2000 requests,
seed 0, at Sarathi-Serve's goodput rate: the p99 JCT requests have ~1000-token prompts and ~600
output tokens, wait a median 62 s (at most 124 s) for their first token against Sarathi's 16 s,
and are passed by a median 133 later arrivals). Aging (``ordering_horizon_s``) cannot bound this
at a large ``u``: every key lies beyond ``arrival + H``, so the order becomes FCFS. Promotion
applies the cap only once it is reached: a PT still queued at ``arrival + W`` is *promoted*, its
key becomes ``arrival + W`` (so only PTs whose keys are already past, in practice other promoted
PTs, in arrival order, go before it); a PT started within ``W`` never sees it and the others
keep their static keys. A min-heap of promotion times re-sorts each PT once (a PT preempted
later keeps its promoted key); promotion is not an event: due PTs are promoted at the next
scheduling call an event starts (an arrival, a finish, a prompt done), the calls that admit, so
a bulk stretch of decode steps changes nothing. Off by default: it bounds the tail but gives
back most of the goodput gain, because near the goodput rate many PTs wait longer than ``W``
and the order among them becomes FCFS.
Measured (full mode; ``benchmarks/results/policy_tail_notes.md``), goodput / Sarathi's (p99 JCT
/ Sarathi's) at ``u = 64`` without it and with ``W`` = 5 / 10 / 20 s: Azure conv 1.09 (1.24x) ->
1.02 (0.97x) / 1.03 (0.99x) / 1.04 (1.11x); Azure code 2.05 (1.23x) -> 1.48 (0.99x) / 1.73
(1.16x) / 1.98 (1.26x); ShareGPT 40 GB 1.19 (1.01x) -> 1.06 / 1.09 at 10 / 20 s (0.98 / 0.99x),
80 GB 1.06 (0.99x) -> 1.03 / 1.04; true lengths at 40 GB 1.31 (1.11x) -> 1.01 (1.10x) / 1.04
(1.13x): there the p99 requests are ~1000-token answers whose JCT is mostly their own decode.
An SLO-relative bound (promotion after a share of the request's slack-only SLO budget, in place
of ``W``) was worse on both counts (Azure code 1.51 / 1.37 at shares 0.8 / 0.5).
The promotion gate (``promotion_attainment = a``, ``promotion_window = N``) promotes only while
the SLO attainment the policy measures over its last ``N`` finished requests is at least ``a``
(JCT against ``slo_scale`` x the isolated estimate with the true output length, known once a
request finished): the tail is bounded while the SLO has headroom, and Ordering passes without
bound once it has not. It answers the frontier above, where the target wants the tail at the
baseline's goodput rate (EconoServe meets 97-99 % of SLOs there) and the gain at a higher rate
(where a fixed ``W`` turns the order to FCFS). Off by default: it costs 1-2 % of goodput at
ShareGPT 80 GB, the headline regime, which then sits at 1.09-1.11. Measured (full mode, with
the 3 % probe lane; ``benchmarks/results/policy_tail_notes.md``), ``W`` = 10 s, ``a`` = 0.97,
``N`` = 300 / 500, goodput / Sarathi's (p99 JCT / Sarathi's): Azure conv 1.13 (1.05x) -> 1.12 (0.93x / 0.92x)
where plain ``W`` = 10 s gives 1.07 (0.89x); ShareGPT 80 GB 1.12 -> 1.11 / 1.10; 40 GB 1.20 ->
1.17 / 1.20; QMSum 1.16 -> 1.15 / 1.16; Gamma, Alpaca and Azure code unchanged. On Azure code
the misses come in the bursts: in the steps where a PT has waited ``W`` the last 300 finished
requests met a median 92 % of their SLOs (seed 0 at Sarathi's rate; 97.6 % over the run), and
nothing is promoted; its tail (a closing burst of ~140 requests in 22 s) stays at 1.20x. With
``a`` = 0.98, ``N`` = 500 and the 5 % lane: Azure conv 1.12 (0.93x), ShareGPT 80 GB 1.13 and 40 GB
1.29 (as the default), but on three more traces 80 GB 1.12 -> 1.11 and the 40 GB tail 1.10x -> 1.08x:
the window of finished requests lags the queue, so the gate is still open when an overload begins.
The idle gate (``promotion_idle_share = x`` over ``promotion_idle_window_s = H``) promotes only
while the engine stood idle (nothing running or queued) for at least a share ``x`` of the last
``H`` seconds: a server that idles is short of capacity only inside its bursts, where passing
leaves a burst's long prompts for last. It reads the load over minutes, not the burst: on the
scoreboard's other eight regimes the engine is busy 98-100 % of the run, at the baseline's
goodput rate and at EconoServe's, so the gate never opens and every cell equals the default's;
Azure code's engine is busy 13-24 % (compute-bound bursts between idle stretches). An idle
stretch runs from the start of the step that emptied the engine to the next scheduling call; the
share slides with the clock between events, hence promotions at event calls only (above).
Measured (full mode, 2000 requests, seeds 0-1;
``benchmarks/results/policy_idle_gate_notes.md``) on Azure code, goodput / Sarathi's (p99 JCT
/ Sarathi's), ungated 2.15 (1.20x): ``W`` = 6 / 7 / 8 / 10 s at ``x`` = 0.5 1.83 / 1.91 / 1.95
/ 2.00 (1.02 / 1.02 / 1.03 / 1.06x); at ``W`` = 7 s ``x`` = 0.1 / 0.25 / 0.7 / 0.8 1.69 / 1.85 /
1.95 / 2.03 (1.02x, 0.8: 1.20x); plain ``W`` = 5 s 1.48 (0.95x). It fixes the tail where the
tail is a burst after idle stretches, and nothing else: on the same trace cut into 1000-request
windows (seeds 0-3) the default's p99 is 1.09x and gated 1.10-1.13x (goodput 2.19 -> 1.84-2.02),
because there the tail is long answers' own decode and a burst that continues the previous
window's closing burst: run after the requests before it, the engine has been busy for minutes,
the gate stays shut, and plain promotion costs SLO attainment there (0.954 -> 0.873). Off by
default: of the tails measured it answers one, on one cut of one trace, at 11 % of its goodput.

**Slowdown cap** (``decode_slowdown_cap = s``). A decode step reads the weights once and the KV of
every request in it. Near the goodput rate the queue is where Ordering works: it decides who starts
next, and the short answers, whose SLO is a few isolated decode steps, go first. A cache larger than
the batch needs admits everyone at once instead: the queue empties, every step slows, and those
answers miss. So the policy uses at most the KV whose reading adds ``s - 1`` isolated decode steps to
a step, ``(s - 1) * T_d / T_ctx`` tokens (``T_ctx`` = ``decode_time_per_context_token_s``, what one
more cached token adds to a decode step; in a memory-bound step ``s = 3`` is KV of about twice the
weights' bytes), and never less than two full-context requests need. Its KV cache (point 2) has that
many blocks, so the curve, the reserve, the probe lane and preemption all see the smaller cache: a
request that grows past it preempts as on a full cache. Where the cache is smaller the cap changes
nothing: it is 1.25x OPT-13B's cache on an A100-80GB (1.28x Llama-2-13B's) and 5.5x on an A100-40GB,
so every A100 regime of the scoreboard is served exactly as without it. Default ``s = 3``. Measured
(full mode, 2000 requests, seeds 0-1; ``benchmarks/results/policy_slowdown_cap_notes.md``):
without the cap, more memory took EconoServe's gain away. With a cache 4x OPT-13B's on an A100-80GB it
served 1.04x Sarathi-Serve's goodput, where 1x serves 1.13x; Sarathi-Serve itself gains 4 % from the
larger cache. On an H200 (141 GB) it served 1.04x the strongest baseline's goodput, and on Llama-2-7B
(the Azure conversation trace, A100-80GB) also 1.04x. With ``s = 3`` the H200 serves 1.09x (p99 JCT
1.02x) and Llama-2-7B 1.07x (p99 1.11x, against 0.96x without the cap). ``s`` trades goodput for tail:
on the H200, 2.5 / 2.8 / 3.2 serve 1.13 / 1.11 / 1.06x at a p99 of 1.30 / 1.12 / 1.00x; Llama-2-7B
prefers a larger ``s`` (3.6: 1.10x, p99 0.94x). A first version capped only admission (the curve's
capacity and the room a starting prompt may take): growth past the cap went on unchecked, and on the
H200 (seed 0) it served 24.8-25.5 req/s at ``s`` = 2.5-3.2, against 27.7 with the smaller cache.
*Release* (``slowdown_cap_release_wait_s = W``, ``slowdown_cap_release = r``; off by default).
Under the cap fewer requests run, so a burst's queue lasts longer, and the PTs Ordering passes (on
the Azure conversation trace, prompts of about 1000 tokens with long predictions, 2000 tokens of KV
each) can wait a minute for their first token. With ``W`` set, while a queued PT that arrived at
least ``W`` ago has no first token, the policy's cache is ``r`` times the capped one (at most the
whole cache; ``r = 1.3`` allows a slowdown of 3.6 at ``s = 3``), and the curve and the probe lane
see the larger cache (the global reserve stays as it was); once no PT has waited ``W``,
admissions wait until the KV held fits the capped cache, which the cache then becomes again
(growth goes on meanwhile: the drain preempts nothing). Like promotion, the release is not an
event: admissions use the larger cache from the next invocation on. Measured (full mode, seeds
0-1, goodput over the strongest baseline's and p99 JCT over its, ``r = 1.3``; seeds 2-4 after the
slash): off, H200 1.09 (1.02x) / 1.08 (1.00x), Llama-2-7B 1.07 (1.11x) / 1.15 (1.03x); ``W`` = 5 s,
H200 1.07 (1.02x) / 1.03 (1.00x), Llama-2-7B 1.08 (0.98x) / 1.15 (0.98x); with true lengths the
H200 falls from 1.17 / 1.14 to 1.05 / 1.00. The release cuts the Llama-2-7B tail of a burst, but
it also undoes Ordering's deliberate deferral of long requests, which is where the H200 gains
(``benchmarks/results/policy_slowdown_cap_notes.md``, *Releasing the cap*); so it is a knob.

**Backfill** (``backfill_output_tokens = B``, with ``kvcpipe="all"``). PT admission stops at the
first PT the occupancy curve refuses (point 6) unless ``B`` is set: then later PTs with
allocation ``A <= B`` may still start, in queue order, each by the same free-pool and curve
tests (the refused PT keeps its place and its term is not in the curve). Off by default:
measured (2000 requests, 2 seeds; ``benchmarks/results/policy_ordering_backfill.md``,
``policy_backfill_more.md``) with ``B = 64`` goodput / Sarathi's 1.01 / 1.10 / 1.03 / 1.05
(ShareGPT 80 GB / 40 GB / Gamma CV 3 / Azure conv; default 1.01 / 1.09 / 1.03 / 1.05), p99 JCT
0.99 / 1.00 / 1.00 / 1.18x (default 0.99 / 1.04 / 1.00 / 1.18x), SLO attainment at Sarathi's
goodput rate +0.3 / +0.5 / -0.1 / +0.1 points: within the 2 % bisection step.

**Probes** (``probe_output_tokens = k``, ``probe_share = s``, ``probe_exit``, with
``kvcpipe="all"``; in the spirit of FastServe's skip-join MLFQ: a request's first ``k`` tokens do
not trust its predicted length). Only a request whose prediction the executor will refine by
``k`` tokens (``Request.refine_after_tokens <= k``, *Refined predictions* below) may probe: a probe
starts before its length is trusted and is re-sized when the refined prediction arrives; without
one it would only defer the same prediction (measured below). A *probe lane* of ``L = floor(s *
num_blocks)`` blocks is set aside from the first arrival refined by ``k`` on (an executor without
refinement keeps none, and the policy is then exactly the one without probes): a probe counts its
*probe size* ``blocks_for(prompt + k - 1)`` against the lane, and the curve's capacity (point 6)
for a full-term admission is the usual one less the lane's unused part, ``L - sum(probe sizes)``;
in the curve a probe is a *hold* term (its probe size from now on). PT admission as before until
the curve or the free pool refuses a PT; from that PT on, in key order, PTs refined by ``k`` that
have generated fewer than ``k`` tokens start as probes while their probe
size fits in the lane's unused part and their prompt in the free pool (stop at the first that
does not). A probe whose request ends within ``k`` tokens finishes like any request. At ``k``
tokens unfinished (``probe_exit``): with ``continue`` (default) it leaves the lane and goes on as a
plain request (its full term replaces the hold term; growth takes the free pool, then the
reserve, then preemption, point 7). With ``pause`` it *pauses*: it leaves the running set, keeps
its KV, does not decode, and waits in the GT queue by its GT key; paused probes and PTs are
admitted in one merged key order (a paused probe with a key at most the next PT's is tried
first), a paused probe if the curve admits its remaining term (it holds what it holds and grows
``A - g`` tokens from now) with the lane's unused part included (it is in the lane already) or
if nothing runs; the first refused stops full-term admissions (probes may still start), so no
paused probe is passed by a larger key. Growth that finds no block preempts a paused probe
first (largest GT key: its KV is idle), then as in point 7. A preempted probe is a plain PT again
(it may probe again while it has fewer than ``k`` tokens). With ``evict``, at the next step (after
any refined prediction, below, has arrived; probes at ``k`` in GT-key order) it goes on as a
plain request if the curve admits its remaining term (as a paused probe resumes: it holds what
it holds and grows ``A - k`` tokens from now, the lane's unused part included) or nothing else is
in flight; else it is *evicted*: preempted by recompute (its KV freed at once; its ``k`` tokens
kept, to be re-prefilled with the prompt; counted as a preemption and in ``probe_evictions``) and
queued as a PT by its PT key, admitted later by the curve with its full term (prompt + ``k``
tokens from its prefill on, ``A - k`` to grow), never as a probe again. KV is never over-committed
(every block comes from the free pool or the reserve). **Default ``k = 16, s = 0.05``,
``continue``**, measured with refinement at ``k`` and the prefill cap in full mode (2000
requests, 2 seeds; ``benchmarks/results/policy_probe_share_notes.md``, last section): goodput /
Sarathi's at 80 GB / 40 GB / Gamma CV 3 1.13 / 1.29 / 1.07 (p99 JCT 1.03 / 1.02 / 1.01x), against
1.12 / 1.20 / 1.07 (1.02 / 1.00 / 0.99x) with ``s = 0.03``, the default before; on three more
traces 1.12 / 1.32 (p99 1.02 / 1.10x) against 1.11 / 1.24 (1.01 / 1.12x). The lane's width is the
trade: with ``s = 0.1`` 1.15 / 1.37 / 1.07 but p99 1.12x at 40 GB (probes that go on past ``k``
over-fill the curve: 2.5 % of requests preempted there at Sarathi's goodput rate, 2.0 % with
``s = 0.05``, 1.4 % with ``s = 0.03``). Before the prefill cap the same lanes measured 1.12 / 1.18 /
1.07 (p99 1.03 / 1.03 / 1.01x) at ``s = 0.03``, 1.14 / 1.27 / 1.07 (p99 1.05 / 1.07 / 1.03x) at
``s = 0.05`` and 1.16 / 1.36 / 1.08 (p99 40 GB 1.17x) at ``s = 0.1``: with the cap, a wider lane
costs less at the tail (40 GB p99 1.02x against 1.07x at ``s = 0.05``). Probes without
refinement (the rule above forbids them) measured 1.07-1.10 at 80 GB and raised the Azure
conversation trace's p99 JCT from 1.24x to 1.33x Sarathi's. Earlier settings (quick mode, 1000
requests, probes without refinement; ``benchmarks/results/policy_probe_quick.md``,
``policy_probe_notes.md``) goodput /
Sarathi's at 80 GB / 40 GB / Gamma CV 3 / Azure conv: default 1.03 / 1.07 / 1.03 / 1.07 (p99
JCT 0.98 / 0.99 / 1.00 / 1.09x); ``k = 16, s = 0.1`` 1.04 / 1.09 / 1.03 / 1.07 (0.99 / 1.04 /
1.00 / 1.27x); ``k = 32, s = 0.2`` 1.06 / 1.09 / 1.04 / 1.09 (1.01 / 1.14 / 1.00 / 1.66x);
``k = 32, s = 0.3`` with ``probe_exit="pause"`` 1.01 / 0.99 / 1.01 / 1.00 (p99 up to 1.6x: paused
probes wait, and growth preempts them); true lengths 1.30 / 1.38 / 1.23 / 1.07, with ``k = 16,
s = 0.1`` 1.22 / 1.38 / 1.12 / 1.07. At Sarathi's goodput rate the probes do what they are for
(ShareGPT 40 GB: SLO attainment 0.963 -> 0.987, answers of 9-32 tokens 0.91 -> 0.99, their
TTFT p90 1.6 s -> 0.9 s), but the cache is full when short answers wait (committed blocks at
the curve's capacity), so a probe's room comes from the long requests: past ``k`` they
over-fill the curve and 10-20 % of requests are preempted near the goodput rate. Eviction
(``probe_exit="evict"``; ``benchmarks/results/policy_evict_notes.md``, ``policy_evict_quick.md``,
``policy_evict_full.md``) serves the shortest answers best (ShareGPT 40 GB at Sarathi's rate:
1-8 tokens 0.70 -> 0.94, TTFT p90 2.3 s -> 0.4 s) but an evicted long request waits a second
time: goodput / Sarathi's in full mode (2000 requests, 2 seeds) at 80 GB / 40 GB / Gamma CV 3
1.08 / 1.07 / 1.01 (p99 JCT 1.03 / 1.39 / 1.01x) with ``k = 32, s = 0.2``, against 1.05 / 1.13 /
1.03 (1.02 / 1.10 / 1.01x) for ``continue`` at ``k = 16, s = 0.1`` with refinement (below).
Evicting against the lane-reduced capacity of a new PT instead (all probes past ``k`` but the
few that fit it) was worse than ``continue`` everywhere (35-58 % of requests preempted at 40 GB).

**The predicted distribution** (optional; ``predicted_output_quantiles`` of a request: ``K``
equally likely lengths ``s_1 <= .. <= s_K`` [tokens], e.g. the bucket quantiles of the
classification predictor). Three knobs read it; without a distribution each falls back to the
point prediction. *Ordering* (``ordering_length``): the keys use, instead of ``A``, the Gittins
rank at zero attained service ``r = min_k E[min(S, s_k)] / P(S <= s_k)`` (``"gittins"``;
``r = L`` for a point mass at ``L``; a request with a good chance of ending early ranks low) or
the ``ordering_quantile``-th point (``"quantile"``). *Allocation* (``allocation_length="mean"``):
``P`` is the mean of the points above ``g`` (the tokens generated), so a request that outgrew
its allocation is re-sized from the lengths it can still have. *Reserve* (``reserve_rule=
"overrun"``, with ``kvcpipe="all"``): no fixed reserve; the curve's capacity is
``num_blocks - ceil(sum_i E[(S_i - A_i)+ | S_i > g_i] / block_size)`` over every request in
flight and the candidate (the expected over-run beyond the allocations the curve counts).
All three are off by default: measured (quick mode, ShareGPT's classification model as the
distribution; ``benchmarks/results/policy_distribution_notes.md``) goodput / Sarathi's at 80 GB /
40 GB / Gamma CV 3 / Azure conv was 1.03 / 1.07 / 1.03 / 1.07 by default, 1.03 / 1.06 / 1.00 /
1.07 with Gittins ordering (the distribution ranks lengths no better than the point prediction:
Spearman 0.58 vs 0.62), 1.03-1.04 / 1.06 / - / 1.07 with the mean allocation (Azure p99 JCT
1.09x -> 1.04x), and 0.99 / 0.89 / 0.96 / 1.04 with the overrun reserve (it keeps several times
the fixed 2 % free).

**Refined predictions** (optional; trace columns ``refine_after_tokens`` = ``k`` and
``refined_output_tokens``). When a request has generated ``k`` tokens unfinished, the executor
hands the policy a prediction from the prompt *and* those ``k`` tokens
(:mod:`econoserve.predictor.refine`; :meth:`Policy.refine_prediction`). EconoServe then re-sizes
``A`` from it, and with ``A`` the request's occupancy-curve term, its allocation target and its
GT key; a queued request is re-sorted and the next step re-runs admission. KV already held is
kept. Measured (2000 requests, 2 seeds; ``benchmarks/results/policy_refine_notes.md``,
``policy_probe_refine_full.md``): ShareGPT's refined model ranks the held-out responses longer
than 16 tokens at Spearman 0.68 (prompt-only 0.53). Goodput / Sarathi's at 80 GB / 40 GB / Gamma
CV 3 was 1.01 / 1.10 / 1.03 with refinement at ``k = 16`` (default 1.01 / 1.09 / 1.03): the refined
value arrives after the request was admitted, and admission order is where the oracle gains. With
probes at the same ``k`` (lane 0.1, ``u = 0``) it was 1.05 / 1.13 / 1.03 (p99 JCT 1.02 / 1.10 /
1.01x); with the KV-cost order and the default lane see *Probes*. The executor declares the
refinement point at arrival (``Request.refine_after_tokens``), so the policy knows which requests
may probe. Without refinement nothing changes, and nothing probes.

**Ablations** (point 9): ``no_kvcpipe``, ``no_ordering``, ``no_syncdecoupled`` (one coupled
queue: a request decodes as soon as its prompt is done, KV on demand as in vLLM, the victim of
a preemption the lowest-priority running request; decided every step) and ``oracle_rl`` (the
executor passes the true length as the prediction).
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from econoserve.policy.base import DEFAULT_SLO_SCALE, EngineLimits, Policy, require_positive
from econoserve.policy.decision import SchedulerDecision
from econoserve.policy.kv_cache import KVCache
from econoserve.policy.request import Request, RequestStatus

#: How a PT's admission guards the KV its request will need as a GT (see the module docstring).
PROMPT_ADMISSION_RULES: tuple[str, ...] = ("lookahead", "prompt")
#: KVCPipe variants: lend idle tails only; also admit the head GT by the predicted occupancy
#: curve; or admit every request, prompts included, by the curve with KV allocated as used.
KVCPIPE_MODES: tuple[str, ...] = ("tail", "curve", "all")
#: The response length Ordering's keys use (see ``ordering_length``).
ORDERING_LENGTHS: tuple[str, ...] = ("point", "gittins", "quantile")
#: The predicted length allocations (and KVCPipe's curve) are sized from (see ``allocation_length``).
ALLOCATION_LENGTHS: tuple[str, ...] = ("point", "mean")
#: How the global reserve is sized (see ``reserve_rule``).
RESERVE_RULES: tuple[str, ...] = ("fixed", "overrun")
#: What a probe does at ``probe_output_tokens`` tokens unfinished (see ``probe_exit``).
PROBE_EXITS: tuple[str, ...] = ("continue", "pause", "evict")
#: The start [steps] of a *hold* term in the occupancy curve: a term that starts growing this far
#: in the future never grows, so it holds ``blocks_for(base)`` from now on (a probe, see
#: ``probe_output_tokens``).
HOLD_START_STEPS = 2**40
#: Entries the promotion heap may hold beyond twice the PT queue before a shut promotion gate
#: prunes those of PTs no longer queued (a bound on memory, not a policy setting).
PRUNE_SLACK_ENTRIES = 64


@dataclass(frozen=True)
class EconoServeConfig:
    """Every knob of the EconoServe policy (units in brackets).

    rl_bucket:
        Width of a predicted-response-length bucket [tokens]; GTs of one bucket form a
        time-synced group, and allocations are rounded up to a bucket boundary.
    rl_padding:
        Relative padding of the predicted length before allocation [fraction]; 0.1 allocates
        110 % of the prediction (then rounded up to the bucket). A quantile predictor (e.g.
        ``q = 0.9``) is the alternative way of padding: train it and set this to 0.
    reserve_ratio:
        Global reserve for mispredicted GTs [fraction of the KV blocks]. 0.02 by measurement
        (``benchmarks/results/policy_knobs.md``: on ShareGPT at 40 GB goodput 1.07x Sarathi's
        with 0.05, 1.09x with 0.02, 1.10x with 0, p99 JCT rising 1.01x -> 1.04x -> 1.05x; at
        80 GB no difference in goodput).
    token_budget:
        Most tokens in a step, GT decodes + prompt tokens [tokens]; ``None`` = the engine's
        saturating token budget (from the latency model).
    prefill_decode_steps:
        Prefill cap ``k`` [isolated decode steps]: a step carries at most the prompt tokens whose
        prefill takes ``k`` isolated decode steps, ``max(1, k * T_d / T_p)`` from the engine's
        time estimates (:attr:`EconoServePolicy.prefill_cap_tokens`), within the token budget;
        ``None`` = the token budget alone (the default before issue 10's step measurements;
        see the module docstring, *Steps*).
    max_num_seqs:
        Most requests scheduled in a step, GTs + PTs [requests] (vLLM's default 256).
    slo_scale:
        SLO target used by Ordering: JCT <= ``slo_scale`` x estimated isolated time.
    gt_occupancy_weight:
        How far each held KV token moves a GT ahead in the GT queue [decode steps per token];
        0.1 means 10 held tokens count as one decode step less of slack.
    repeat_victim_limit:
        A running GT preempted this many times [preemptions] is a victim again only when every
        other candidate is too (see the module docstring, *Repeat victims*); ``None`` = no limit.
    fallback_output_tokens:
        Allocation for a request without a prediction [tokens]; ``None`` = the model's context
        less the prompt (maximum allocation).
    no_kvcpipe, no_ordering, no_syncdecoupled:
        Ablation switches (see the module docstring).
    oracle_rl:
        Ask the executor for the true response length as the prediction.
    prompt_admission:
        ``lookahead``: a PT starts only if the free pool covers its prompt and the exact
        allocations still owed to every PT and queued GT, its own included; ``prompt``: only its
        prompt, less what the GT queue's head still needs (more prompts in flight; queued GTs
        then rely on freed space and KVCPipe). Not used with ``kvcpipe="all"`` (the curve
        decides).
    kvcpipe:
        ``tail``: lend idle tails of running GTs to guests (point 6); ``curve``: also admit the
        head GT when the predicted KV occupancy curve of all generating GTs, with it, stays
        within the cache at every future step (the generalisation of point 6); its
        allocation is then reserved as far as the free pool allows and the rest allocated as it
        grows, from space the curve predicts will have been freed; ``all``: every request,
        prompts included, is admitted by the predicted occupancy curve of everything in flight
        (PTs, queued and generating GTs), and KV is allocated as it is used (no reservation
        beyond the prompt); a GT generates as soon as its prompt is done.
    prefill_delay:
        With ``kvcpipe="all"``, model in the curve that a PT starts to grow only when its prompt
        is done: ``ceil(prompt tokens ahead of it and its own / (token budget - decodes))`` steps
        from now. False: every PT is taken to start generating at once (measured: SLO attainment
        0.3-0.4 points lower near the goodput rate on ShareGPT).
    overbooking:
        With ``kvcpipe="all"``, how far the predicted peak may exceed the cache less the global
        reserve [fraction]; 0.05 admits up to a peak of 105 %. Preemption is the backstop.
        Default 0: on ShareGPT near the goodput rate 0.05 preempted 13-34 % of requests and
        raised the p99 JCT 8-12 %, for -2.7 (80 GB) to +0.5 (40 GB) points of SLO attainment.
    decode_slowdown_cap:
        The most a decode step may slow down, from the KV it reads, over an isolated one, ``s``
        [x]: the policy uses at most ``(s - 1) * decode_time_per_step_s /
        decode_time_per_context_token_s`` tokens of the cache (and never less than two
        full-context requests need; see the module docstring, *Slowdown cap*). ``None``, or an
        engine whose context costs nothing (``decode_time_per_context_token_s = 0``) = the whole
        cache.
    slowdown_cap_release_wait_s:
        Release of the slowdown cap, ``W`` [s]: while a queued PT that arrived at least ``W`` ago
        has no first token, the policy's cache grows to ``slowdown_cap_release``'s; once none
        has, admissions wait until the KV held fits the capped cache again, which it then
        becomes (see the module docstring, *Slowdown cap*). ``None`` = never released (the
        default: measured, ``W`` = 5 s cuts the Llama-2-7B p99 JCT from 1.11x to 0.98x the
        strongest baseline's and costs the H200 2-5 % of goodput, 10-14 % with true lengths).
    slowdown_cap_release:
        How many times larger the capped cache is while released, ``r`` [x] (``> 1``; at most
        the whole cache): the slowdown it allows rises from ``s`` to ``1 + r * (s - 1)``, 3.6
        for ``s = 3`` and ``r = 1.3``. ``None`` = the whole cache.
    ordering_horizon_s:
        Aging of Ordering [s]: a request is never passed by one that arrived more than this
        later (its key is capped at ``arrival + ordering_horizon_s``); ``None`` = no cap.
    late_demotion_s:
        Ordering under overload [s]: a PT whose latest start that meets its estimated deadline
        (by its SLO slack alone, whatever ``ordering_prompt_weight``) is more than this in the past
        yields to every PT that can still meet its deadline; ``None`` = strict key order.
    ordering_length_weight:
        Shrinkage ``w`` of the predicted response length in Ordering's keys [fraction]: the keys
        use ``w * A`` output tokens instead of ``A`` (allocation and KVCPipe still use ``A``).
        ``w`` is the slope of a linear calibration ``E[true | A] = c + w * A`` (the offset ``c``
        cancels in the key order), so ``w < 1`` trusts a noisy predictor's ranking less; 0 is
        (nearly) FCFS. Allocation is unaffected.
    backfill_output_tokens:
        Backfill past a refused PT [tokens]: with ``kvcpipe="all"``, once the occupancy curve
        refuses a PT, later PTs whose allocation ``A`` is at most this may still start (in queue
        order, each by the same curve and free-pool test), so short requests do not wait behind
        a long one (head-of-line blocking); ``None`` = stop at the first refused PT.
    ordering_length:
        The response length [tokens] Ordering's keys use: ``point``, the allocation ``A`` (from
        the point prediction); ``gittins``, the Gittins rank of the predicted distribution
        (``predicted_output_quantiles``) at zero attained service; ``quantile``, its
        ``ordering_quantile``-th quantile. Without a distribution a request's is the point
        prediction itself. Allocation and KVCPipe always use ``A``.
    ordering_quantile:
        The quantile level of ``ordering_length="quantile"`` [fraction in (0, 1)].
    reserve_rule:
        ``fixed``: the global reserve is ``reserve_ratio`` of the cache; ``overrun`` (with
        ``kvcpipe="all"``): no fixed reserve; the occupancy curve instead keeps free the expected
        over-run of the requests in flight by the predicted distribution (see the module
        docstring), 0 for a request without one.
    allocation_length:
        The predicted length ``P`` an allocation ``A`` (and so KVCPipe's occupancy curve) is
        sized from: ``point``, the point prediction; ``mean``, the mean of the predicted
        distribution given the tokens generated so far (a request that outgrew its allocation
        is re-sized from the points it has not yet outlived, and only past all of them by one
        more bucket). Without a distribution both are the point prediction.
    probe_output_tokens:
        Length of the length-agnostic first phase ``k`` [tokens], with ``kvcpipe="all"``: once
        the occupancy curve (or the free pool) refuses a PT, it and the PTs behind it in key
        order that have generated fewer than ``k`` tokens and whose prediction the executor
        will refine by then (``Request.refine_after_tokens <= k``) may start as *probes* in the
        probe lane (``probe_share``), each counted there at ``prompt + k - 1`` tokens whatever
        its prediction; at ``k`` generated tokens a probe leaves the lane (see the module
        docstring, *Probes*). Default 16; ``None`` = no probes. Without refinement (no refined
        model, true lengths) nothing probes. Not with ``backfill_output_tokens`` (two ways past
        a refused PT: set ``probe_output_tokens=None`` to backfill).
    probe_share:
        The probe lane [fraction of the KV blocks]: probes hold at most this share of the cache,
        each counted at its probe size ``blocks_for(prompt + k - 1)``, and the lane's unused
        part is kept out of the curve's capacity for full-term admissions. Default 0.05 (with the
        prefill cap, the widest lane that keeps the p99 JCT within 1.05x Sarathi-Serve's at 40
        GB; wider lanes over-fill the curve past ``k``, see *Probes*). Used only with
        ``probe_output_tokens``.
    probe_exit:
        What a probe does at ``k`` tokens unfinished: ``continue``, it goes on as a plain
        request (its full term enters the curve; preemption is the backstop); ``pause``, it
        *pauses* (keeps its KV, does not decode) in the GT queue until the curve admits its
        remaining ``A - k`` tokens, competing with PTs in key order; ``evict``, it goes on if
        the curve (the lane's unused part included) admits its remaining term at the next step,
        else it is *evicted*: preempted by
        recompute (its KV freed at once, its ``k`` tokens kept, to be re-prefilled) and queued
        as a PT in key order, to be admitted by the curve with its full term, never as a probe
        again. Used only with ``probe_output_tokens``.
    ordering_prompt_weight:
        KV cost in Ordering's keys ``u`` [dimensionless, >= 0]: the keys use, instead of the response
        length ``L`` they would use (``ordering_length`` x ``ordering_length_weight``), its
        *KV-time equivalent* ``sqrt(L**2 + 2 * u * prompt * L)`` [tokens], the response length
        of a prompt-less request that holds as many KV token-steps as this one
        (``L * (u * prompt + L / 2)``); ``u = 1`` counts the prompt's KV in full, and of two
        requests with the same predicted length the longer prompt is pushed later; a large ``u``
        orders by ``prompt * L`` with the arrival time counting less. Default 64; 0 = the keys
        count the prompt only by its prefill time (SLO slack alone, the default before issue
        10's measurements). Measured: see the module docstring (*Ordering*).
    ordering_promotion_wait_s:
        Bound on how long Ordering may pass a PT, ``W`` [s]: a PT still queued ``W`` after its
        arrival is *promoted*: its PT key (and later its GT key's base) becomes its promotion
        time ``arrival + W``, so from then on only PTs whose keys are already past (in practice
        other promoted PTs, in arrival order) go before it; a PT started within ``W`` never
        sees it. The dynamic counterpart of ``ordering_horizon_s`` (whose cap applies from the
        arrival on, and at a large ``ordering_prompt_weight`` caps every key: FCFS). ``None`` =
        never promoted. Measured: see the module docstring (*Ordering*).
    promotion_attainment:
        Gate on promotion, ``a``: PTs are promoted only while the SLO attainment the policy
        measured over its last ``promotion_window`` finished requests is at least ``a`` (and not
        before that many have finished); below it Ordering passes without bound, as without
        ``ordering_promotion_wait_s``. A finished request met its SLO if its JCT, arrival to the
        first scheduling call after its last step, is at most ``slo_scale`` x its isolated time
        estimate ``prompt * T_p + output * T_d`` (its true output length, known once it
        finished). Needs ``ordering_promotion_wait_s``. ``None`` = no gate. Measured: see the
        module docstring (*Ordering*).
    promotion_window:
        Finished requests the gate's attainment counts [requests].
    promotion_idle_share:
        Gate on promotion, ``x``: PTs are promoted only while the engine stood idle (nothing
        running or queued) for at least a share ``x`` of the last ``promotion_idle_window_s``
        seconds; a server that keeps busy passes without bound, as without
        ``ordering_promotion_wait_s``. An idle stretch runs from the start of the step that
        emptied the engine to the next scheduling call (so it counts that step's time as
        idle). With ``promotion_attainment`` too, both gates must be open. Needs
        ``ordering_promotion_wait_s``. ``None`` = no gate. Measured: see the module docstring
        (*Ordering*).
    promotion_idle_window_s:
        The time the idle gate looks back over [s].
    """

    rl_bucket: int = 32
    rl_padding: float = 0.1
    reserve_ratio: float = 0.02
    token_budget: int | None = None
    prefill_decode_steps: float | None = 1.75
    max_num_seqs: int = 256
    slo_scale: float = DEFAULT_SLO_SCALE
    gt_occupancy_weight: float = 0.1
    repeat_victim_limit: int | None = 2
    fallback_output_tokens: int | None = None
    no_kvcpipe: bool = False
    no_ordering: bool = False
    no_syncdecoupled: bool = False
    oracle_rl: bool = False
    prompt_admission: str = "prompt"
    kvcpipe: str = "all"
    prefill_delay: bool = True
    overbooking: float = 0.0
    decode_slowdown_cap: float | None = 3.0
    slowdown_cap_release_wait_s: float | None = None
    slowdown_cap_release: float | None = 1.3
    ordering_horizon_s: float | None = None
    late_demotion_s: float | None = None
    ordering_length_weight: float = 1.0
    backfill_output_tokens: int | None = None
    ordering_length: str = "point"
    ordering_quantile: float = 0.25
    reserve_rule: str = "fixed"
    allocation_length: str = "point"
    probe_output_tokens: int | None = 16
    probe_share: float = 0.05
    probe_exit: str = "continue"
    ordering_prompt_weight: float = 64.0
    ordering_promotion_wait_s: float | None = None
    promotion_attainment: float | None = None
    promotion_window: int = 300
    promotion_idle_share: float | None = None
    promotion_idle_window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.kvcpipe not in KVCPIPE_MODES:
            raise ValueError(f"kvcpipe must be one of {', '.join(KVCPIPE_MODES)}, got {self.kvcpipe!r}")
        if self.prompt_admission not in PROMPT_ADMISSION_RULES:
            raise ValueError(f"prompt_admission must be one of {', '.join(PROMPT_ADMISSION_RULES)}, got {self.prompt_admission!r}")
        require_positive(self, "rl_bucket", "token_budget", "prefill_decode_steps", "max_num_seqs", "slo_scale",
                         "fallback_output_tokens", "repeat_victim_limit")
        if self.rl_padding < 0:
            raise ValueError(f"rl_padding must be >= 0, got {self.rl_padding}")
        if not 0 <= self.reserve_ratio < 1:
            raise ValueError(f"reserve_ratio must be in [0, 1), got {self.reserve_ratio}")
        if self.gt_occupancy_weight < 0:
            raise ValueError(f"gt_occupancy_weight must be >= 0, got {self.gt_occupancy_weight}")
        if self.overbooking < 0:
            raise ValueError(f"overbooking must be >= 0, got {self.overbooking}")
        if self.decode_slowdown_cap is not None and not self.decode_slowdown_cap > 1:
            raise ValueError(f"decode_slowdown_cap must be > 1, got {self.decode_slowdown_cap}")
        if self.slowdown_cap_release is not None and not self.slowdown_cap_release > 1:
            raise ValueError(f"slowdown_cap_release must be > 1, got {self.slowdown_cap_release}")
        require_positive(self, "ordering_horizon_s", "backfill_output_tokens", "probe_output_tokens",
                         "ordering_promotion_wait_s", "promotion_window", "slowdown_cap_release_wait_s",
                         "promotion_idle_window_s")
        for gate in ("promotion_attainment", "promotion_idle_share"):
            value = getattr(self, gate)
            if value is None:
                continue
            if not 0 < value <= 1:
                raise ValueError(f"{gate} must be in (0, 1], got {value}")
            if self.ordering_promotion_wait_s is None:
                raise ValueError(f"{gate} gates promotion: set ordering_promotion_wait_s too")
        if not 0 < self.probe_share <= 1:
            raise ValueError(f"probe_share must be in (0, 1], got {self.probe_share}")
        if self.late_demotion_s is not None and self.late_demotion_s < 0:
            raise ValueError(f"late_demotion_s must be >= 0, got {self.late_demotion_s}")
        if self.ordering_length_weight < 0:
            raise ValueError(f"ordering_length_weight must be >= 0, got {self.ordering_length_weight}")
        if self.ordering_prompt_weight < 0:
            raise ValueError(f"ordering_prompt_weight must be >= 0, got {self.ordering_prompt_weight}")
        if self.ordering_length not in ORDERING_LENGTHS:
            raise ValueError(f"ordering_length must be one of {', '.join(ORDERING_LENGTHS)}, got {self.ordering_length!r}")
        if not 0 < self.ordering_quantile < 1:
            raise ValueError(f"ordering_quantile must be in (0, 1), got {self.ordering_quantile}")
        if self.allocation_length not in ALLOCATION_LENGTHS:
            raise ValueError(f"allocation_length must be one of {', '.join(ALLOCATION_LENGTHS)}, got {self.allocation_length!r}")
        if self.reserve_rule not in RESERVE_RULES:
            raise ValueError(f"reserve_rule must be one of {', '.join(RESERVE_RULES)}, got {self.reserve_rule!r}")
        if self.probe_exit not in PROBE_EXITS:
            raise ValueError(f"probe_exit must be one of {', '.join(PROBE_EXITS)}, got {self.probe_exit!r}")
        if self.probe_output_tokens is not None and self.backfill_output_tokens is not None:
            raise ValueError("probe_output_tokens and backfill_output_tokens are two ways past a refused PT: "
                             "set probe_output_tokens=None to backfill")


#: The slowdown cap never leaves the policy less KV than this many full-context requests need.
SLOWDOWN_CAP_MIN_REQUESTS = 2


def used_kv_blocks(slowdown_cap: float | None, limits: EngineLimits) -> int:
    """The KV blocks EconoServe uses under ``decode_slowdown_cap = slowdown_cap``: the cache, or
    the KV whose reading adds ``slowdown_cap - 1`` isolated decode steps to a step if that is
    smaller, but never less than :data:`SLOWDOWN_CAP_MIN_REQUESTS` full-context requests need
    [blocks]."""
    cache = limits.num_kv_blocks
    if slowdown_cap is None or limits.decode_time_per_context_token_s <= 0:
        return cache
    tokens = (slowdown_cap - 1.0) * limits.decode_time_per_step_s / limits.decode_time_per_context_token_s
    floor = SLOWDOWN_CAP_MIN_REQUESTS * -(-limits.max_model_len // limits.block_size)
    return min(cache, max(int(tokens) // limits.block_size, floor))


def released_kv_blocks(config: EconoServeConfig, limits: EngineLimits, capped_blocks: int) -> int:
    """The KV blocks EconoServe uses while its slowdown cap is released: ``slowdown_cap_release``
    times the capped cache ``capped_blocks``, or the whole cache if that is smaller or the factor
    is ``None``; ``capped_blocks`` if the cap is never released (or does not bind) [blocks]."""
    cache = limits.num_kv_blocks
    if config.slowdown_cap_release_wait_s is None or capped_blocks >= cache:
        return capped_blocks
    if config.slowdown_cap_release is None:
        return cache
    return min(cache, math.ceil(config.slowdown_cap_release * capped_blocks))


def _pipelines_every_request(cfg: EconoServeConfig) -> bool:
    """KVCPipe for every request (``kvcpipe="all"``; not in the no-KVCPipe or coupled ablations)."""
    return cfg.kvcpipe == "all" and not cfg.no_kvcpipe and not cfg.no_syncdecoupled


class EconoServePolicy(Policy):
    """EconoServe (see the module docstring); ablations through :class:`EconoServeConfig`.

    ``waiting`` is not used: the PT queue is a heap of ``(key, seq, request)`` and the GT queue
    a sorted list of the same; ``running`` holds the scheduled requests, PTs (prefilling) and
    generating GTs.
    """

    name = "econoserve"
    config_class = EconoServeConfig
    decides_every_step = False
    uses_predictions = True

    def __init__(self, limits: EngineLimits, config: EconoServeConfig | None = None) -> None:
        super().__init__(limits, config)
        cfg = self.config
        self.decides_every_step = cfg.no_syncdecoupled
        self._pipelined = _pipelines_every_request(cfg)
        k = cfg.prefill_decode_steps
        self._prefill_cap_tokens = self.token_budget if k is None else max(
            1, int(k * limits.decode_time_per_step_s / limits.prefill_time_per_token_s))
        self._pt_queue: list[tuple[float, int, Request]] = []
        self._gt_queue: list[tuple[float, int, Request]] = []
        self._generating: set[int] = set()
        self._allocated_output_tokens: dict[int, int] = {}
        self._gt_key: dict[int, float] = {}
        self._group_of: dict[int, int] = {}
        self._allocation_target: dict[int, int] = {}
        self._sequence = itertools.count()
        self._groups = itertools.count()
        self._event = False
        self._pt_waits_for_budget = False
        self._probing: dict[int, Request] = {}  # probes (running or paused) not yet admitted further
        self._paused: set[int] = set()  # probes at k tokens waiting in the GT queue
        self._exiting: dict[int, Request] = {}  # probes at k tokens, to go on or be evicted next step
        self._lane_open = False  # the executor refines by k (see _enqueue): the probe lane exists
        self._promotions: list[tuple[float, int, tuple[float, int, Request]]] = []  # (promotion time [s], seq, PT queue entry)
        self._promoted: dict[int, float] = {}  # promoted requests -> their promotion time [s]
        self._gates_promotion = self._promotes and cfg.promotion_attainment is not None
        self._finished_unscored: list[Request] = []  # finished since the last step, for the promotion gate
        self._slo_met: collections.deque[bool] = collections.deque(maxlen=self.config.promotion_window)
        self._slo_met_count = 0  # True entries of _slo_met
        self._gates_on_idle = self._promotes and cfg.promotion_idle_share is not None
        self._idle: collections.deque[tuple[float, float]] = collections.deque()  # idle stretches (start, end) [s]
        self._idle_since_s: float | None = None  # the engine stands idle since (the start of the step that emptied it)
        self._step_start_s = 0.0  # the last scheduling call's time [s]
        self._capped_blocks = self.kv_cache.num_blocks  # the cache under the slowdown cap
        self._released_blocks = released_kv_blocks(cfg, limits, self._capped_blocks)  # the cache while released
        self._unstarted: list[tuple[float, int, Request]] = []  # (arrival [s], seq, PT): queued PTs without a first token
        self._cap_draining = False  # released no more, holding more KV than the capped cache: no admissions
        if self._releases_cap:
            self.stats.extra["cap_releases"] = 0
        if self._probes_on:
            for counter in ("probes", "probes_past_k", "probe_pauses", "probe_resumes", "paused_preemptions",
                            "probe_evictions"):
                self.stats.extra[counter] = 0
        if self._promotes:
            self.stats.extra["promotions"] = 0
        for counter in ("groups_formed", "gt_admissions", "kvcpipe_loans", "curve_admissions",
                        "deferred_allocation_blocks", "reserve_extension_blocks", "free_extension_blocks",
                        "gt_evictions", "backfills"):
            self.stats.extra[counter] = 0

    def _make_kv_cache(self) -> KVCache:
        cfg = self.config
        fixed = not cfg.no_syncdecoupled and not (cfg.reserve_rule == "overrun" and _pipelines_every_request(cfg))
        blocks = used_kv_blocks(cfg.decode_slowdown_cap, self.limits)
        reserve = int(cfg.reserve_ratio * blocks) if fixed else 0
        return KVCache(blocks, self.limits.block_size, global_reserve_blocks=reserve)

    # ------------------------------------------------------------------ views
    def _own_token_budget(self) -> int:
        return self.config.token_budget or self.limits.saturating_token_budget

    def _prompt_budget(self, num_decodes: int) -> int:
        """Most prompt tokens a step with ``num_decodes`` decodes may carry [tokens]: what the
        token budget leaves, at most the prompt tokens of ``prefill_decode_steps`` isolated
        decode steps (:attr:`prefill_cap_tokens`)."""
        return min(self.token_budget - num_decodes, self.prefill_cap_tokens)

    @property
    def prefill_cap_tokens(self) -> int:
        """The prompt tokens whose prefill takes ``prefill_decode_steps = k`` isolated decode
        steps, ``max(1, k * T_d / T_p)`` [tokens]; the token budget if ``k`` is None."""
        return self._prefill_cap_tokens

    def _own_max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    @property
    def _probes_on(self) -> bool:
        """Probes (``probe_output_tokens``) need KVCPipe for every request."""
        return self.config.probe_output_tokens is not None and self._pipelined

    @property
    def wants_oracle_predictions(self) -> bool:
        return self.config.oracle_rl

    @property
    def num_waiting(self) -> int:
        """PTs not started plus GTs waiting for their allocation [requests]."""
        return len(self._pt_queue) + len(self._gt_queue)

    def has_unfinished_requests(self) -> bool:
        return bool(self._pt_queue) or bool(self._gt_queue) or bool(self.running)

    def gt_queue(self) -> list[Request]:
        """GTs waiting for an exact allocation, in priority order."""
        return [entry[2] for entry in self._gt_queue]

    def pt_queue(self) -> list[Request]:
        """PTs not started, in priority order."""
        return [entry[2] for entry in self._pt_queue]

    def group_of(self, request_id: int) -> int | None:
        """The time-synced group a GT was admitted in (``None`` if never admitted)."""
        return self._group_of.get(request_id)

    def allocated_output_tokens(self, request: Request) -> int:
        """The response length a GT's exact allocation covers [tokens] (see the module docstring)."""
        rid = request.request_id
        cached = self._allocated_output_tokens.get(rid)
        generated = request.num_output_tokens
        if cached is not None and cached > generated:
            return cached
        cfg = self.config
        room = self.limits.max_model_len - request.num_prompt_tokens
        conditional = self._allocation_length_tokens(request)
        if cached is not None and conditional is None:  # outgrew its allocation: one more bucket
            tokens = generated + cfg.rl_bucket
        else:
            predicted = next((p for p in (conditional, request.predicted_output_tokens) if p is not None),
                             cfg.fallback_output_tokens or room)
            padded = max(1, -int(-predicted * (1.0 + cfg.rl_padding) // 1))
            tokens = cfg.rl_bucket * -(-padded // cfg.rl_bucket)
        tokens = max(min(tokens, room), generated + 1)
        self._allocated_output_tokens[rid] = tokens
        return tokens

    def _allocation_length_tokens(self, request: Request) -> float | None:
        """The predicted length an allocation is sized from [tokens]: with
        ``allocation_length="mean"`` and a predicted distribution, its mean given the tokens
        generated so far (``None`` once the request outlived every point); else ``None`` (the
        point prediction, or one more bucket for a request that outgrew its allocation)."""
        points = request.predicted_output_quantiles
        if self.config.allocation_length != "mean" or points is None:
            return None
        alive = [p for p in points if p > request.num_output_tokens]
        return sum(alive) / len(alive) if alive else None

    def rl_bucket_of(self, request: Request) -> int:
        """The predicted-RL bucket index of a GT (allocation / ``rl_bucket``)."""
        return -(-self.allocated_output_tokens(request) // self.config.rl_bucket)

    def exact_allocation_tokens(self, request: Request) -> int:
        """KV tokens a GT's exact allocation covers: prompt + allocated output - 1, capped by the
        context and the cache less the global reserve [tokens]."""
        kv = self.kv_cache
        tokens = request.num_prompt_tokens + self.allocated_output_tokens(request) - 1
        cap = (kv.num_blocks - kv.global_reserve_blocks) * kv.block_size
        return max(request.num_tokens - 1, min(tokens, self.limits.max_model_len, cap))

    # ------------------------------------------------------------------ ordering
    def _ordering_output_tokens(self, request: Request) -> float:
        """The response length Ordering's keys use: ``ordering_length_weight`` x the allocation,
        or the Gittins rank or a quantile of the predicted distribution (``ordering_length``) [tokens]."""
        cfg = self.config
        points = request.predicted_output_quantiles
        if cfg.ordering_length == "point" or (points is None and request.predicted_output_tokens is None):
            length = float(self.allocated_output_tokens(request))
        elif cfg.ordering_length == "gittins":
            length = gittins_rank_tokens(points or (request.predicted_output_tokens,))
        else:
            points = points or (request.predicted_output_tokens,)
            length = float(points[min(len(points) - 1, int(cfg.ordering_quantile * len(points)))])
        length *= cfg.ordering_length_weight
        u = cfg.ordering_prompt_weight
        if u == 0 or length <= 0:
            return length
        return math.sqrt(length * length + 2.0 * u * request.num_prompt_tokens * length)

    def _time_estimate_s(self, prompt_tokens: float, output_tokens: float) -> float:
        """The engine's estimate of prefilling ``prompt_tokens`` and decoding ``output_tokens``
        alone, ``prompt * T_p + output * T_d`` [s]."""
        limits = self.limits
        return prompt_tokens * limits.prefill_time_per_token_s + output_tokens * limits.decode_time_per_step_s

    def _deadline_s(self, request: Request, output_tokens: float) -> float:
        """The request's estimated deadline for a response of ``L = output_tokens``,
        ``arrival + slo_scale * (prompt * T_p + L * T_d)`` [s]."""
        isolated_s = self._time_estimate_s(request.num_prompt_tokens, output_tokens)
        return request.arrival_time_s + self.config.slo_scale * isolated_s

    def _latest_start_s(self, request: Request, output_tokens: float) -> float:
        """The latest start that meets :meth:`_deadline_s` for a response of ``L =
        output_tokens``: the deadline less the estimate of what remains (the pending prompt,
        ``L`` less the tokens generated) [s]."""
        pending_prompt = 0 if request.is_decoding else request.num_pending_tokens
        remaining_s = self._time_estimate_s(pending_prompt, max(0, output_tokens - request.num_output_tokens))
        return self._deadline_s(request, output_tokens) - remaining_s

    def _slack_start_s(self, request: Request) -> float:
        """The latest start by SLO slack alone [s]: the PT key's formula for ``w`` x the
        allocation, without the KV cost (``ordering_prompt_weight``), promotion or aging."""
        return self._latest_start_s(request, self.config.ordering_length_weight * self.allocated_output_tokens(request))

    def pt_key(self, request: Request) -> float:
        """PT queue key [s]: latest start that meets the estimated deadline (smaller first)."""
        if self.config.no_ordering:
            return request.arrival_time_s
        if request.request_id in self._promoted:
            return self._promoted[request.request_id]
        key = self._latest_start_s(request, self._ordering_output_tokens(request))
        horizon = self.config.ordering_horizon_s
        return key if horizon is None else min(key, request.arrival_time_s + horizon)

    def gt_key(self, request: Request) -> float:
        """GT queue key [s]: the PT key less the weighted KV it holds (smaller first)."""
        if self.config.no_ordering:
            return float(next(self._sequence))
        held_tokens = request.num_computed_tokens
        bonus = self.config.gt_occupancy_weight * held_tokens * self.limits.decode_time_per_step_s
        return self.pt_key(request) - bonus

    def _push_pt(self, request: Request) -> None:
        entry = (self.pt_key(request), next(self._sequence), request)
        bisect.insort(self._pt_queue, entry)
        if self._promotes and request.request_id not in self._promoted:
            promote_at_s = request.arrival_time_s + self.config.ordering_promotion_wait_s
            heapq.heappush(self._promotions, (promote_at_s, next(self._sequence), entry))
        if self._releases_cap and request.num_output_tokens == 0:
            heapq.heappush(self._unstarted, (request.arrival_time_s, next(self._sequence), request))

    @property
    def _promotes(self) -> bool:
        """Promotion of long-waiting PTs (``ordering_promotion_wait_s``; not without Ordering)."""
        return self.config.ordering_promotion_wait_s is not None and not self.config.no_ordering

    def _promote_waiting(self, now_s: float) -> None:
        """Promote every queued PT whose promotion time (arrival + ``ordering_promotion_wait_s``)
        has come: its key becomes that time and it is re-sorted; entries no longer queued (the PT
        started, or was re-keyed or re-queued under a new entry) are dropped. Not an event:
        called at the scheduling calls an event starts (see :meth:`_schedule`)."""
        while self._promotions and self._promotions[0][0] <= now_s:
            at_s, _, entry = heapq.heappop(self._promotions)
            request = entry[2]
            # the entry still queued (bisection on its unique (key, seq)); a promoted PT's entry never is
            index = bisect.bisect_left(self._pt_queue, entry)
            if index == len(self._pt_queue) or self._pt_queue[index] is not entry:
                continue
            del self._pt_queue[index]
            self._promoted[request.request_id] = at_s
            self._push_pt(request)
            self.stats.extra["promotions"] += 1

    def _push_gt(self, request: Request) -> None:
        key = self.gt_key(request)
        self._gt_key[request.request_id] = key
        bisect.insort(self._gt_queue, (key, next(self._sequence), request))

    # ------------------------------------------------------------------ executor API
    def admission_check(self, request: Request) -> str | None:
        kv = self.kv_cache
        usable = kv.num_blocks - kv.global_reserve_blocks
        if kv.blocks_for(request.num_prompt_tokens) > usable:
            return (
                f"prompt of {request.num_prompt_tokens} tokens needs {kv.blocks_for(request.num_prompt_tokens)} "
                f"KV blocks; the cache has {kv.num_blocks} less a global reserve of {kv.global_reserve_blocks}"
            )
        return None

    def _enqueue(self, request: Request) -> None:
        if self._probes_on and not self._lane_open and self._refined_by_k(request):
            self._lane_open = True  # the executor refines predictions: probes may start from now on
        self._push_pt(request)
        self._event = True  # an arrival

    def update_from_output(self, decision: SchedulerDecision, finished=()) -> None:
        finished = list(finished)
        super().update_from_output(decision, finished)
        for request in finished:
            self._forget(request)
            self._event = True
            if self._gates_promotion:
                self._finished_unscored.append(request)
        if self._gates_on_idle and not self.has_unfinished_requests():
            self._idle_since_s = self._step_start_s
        if self.config.no_syncdecoupled:
            return
        prompt_done = [
            r for r in decision.scheduled
            if r.status == RequestStatus.RUNNING and r.request_id not in self._generating and r.is_decoding
        ]
        if prompt_done:
            done_ids = {r.request_id for r in prompt_done}
            self.running = [r for r in self.running if r.request_id not in done_ids]
            for request in prompt_done:
                self._push_gt(request)
                if self._probe_reached_k(request):
                    self._end_probe(request, queued=True)
            self._event = True
        if self._probing:
            for request in [r for r in self.running if r.request_id in self._generating and self._probe_reached_k(r)]:
                self._end_probe(request, queued=False)

    def abort_request(self, request: Request) -> None:
        """Drop ``request`` for good from the PT queue, the GT queue or the running set; its KV,
        reservation and any KVCPipe loan are released (a lent tail goes back to its host)."""
        rid = request.request_id
        self._pt_queue = [entry for entry in self._pt_queue if entry[2].request_id != rid]
        self._gt_queue = [entry for entry in self._gt_queue if entry[2].request_id != rid]
        self.running = [r for r in self.running if r.request_id != rid]
        self.kv_cache.free(rid)
        request.status = RequestStatus.FINISHED
        self._forget(request)
        self._event = True

    def _on_prediction_refined(self, request: Request) -> None:
        """A refined prediction (see :meth:`Policy.refine_prediction`): the allocation ``A`` is
        re-sized from it, and with ``A`` the request's occupancy-curve term, its allocation target
        (where growth starts to count as a misprediction) and its GT key; a queued request is
        re-sorted; the next step re-runs admission (a shorter ``A`` frees room in the curve). KV
        already held or reserved is kept (growth still takes it from the cache's pools)."""
        rid = request.request_id
        self._allocated_output_tokens.pop(rid, None)
        if rid in self._allocation_target:
            self._allocation_target[rid] = self.exact_allocation_tokens(request)
        for queue, push in ((self._gt_queue, self._push_gt), (self._pt_queue, self._push_pt)):
            index = next((i for i, entry in enumerate(queue) if entry[2].request_id == rid), None)
            if index is not None:
                del queue[index]
                push(request)
        if rid in self._gt_key and rid in self._generating:
            self._gt_key[rid] = self.gt_key(request)
        self._event = True

    def _forget(self, request: Request) -> None:
        rid = request.request_id
        self._probing.pop(rid, None)
        self._paused.discard(rid)
        self._exiting.pop(rid, None)
        self._generating.discard(rid)
        self._allocation_target.pop(rid, None)
        self._allocated_output_tokens.pop(rid, None)
        self._gt_key.pop(rid, None)
        self._promoted.pop(rid, None)

    # ------------------------------------------------------------------ probes
    def _probe_reached_k(self, request: Request) -> bool:
        """Is ``request`` a probe that has generated its ``probe_output_tokens``?"""
        return request.request_id in self._probing and request.num_output_tokens >= self.config.probe_output_tokens

    def _end_probe(self, request: Request, queued: bool) -> None:
        """``request``, a probe, has generated ``k`` tokens unfinished (``probe_exit``): with
        ``continue`` it leaves the probe lane and goes on as a plain request; with ``pause`` it
        pauses (a generating GT leaves the running set; ``queued``: it is in the GT queue
        already) and waits there, holding its KV, until :meth:`_resume` admits its remaining
        term; with ``evict`` the next step decides (:meth:`_exit_probes`), after any refined
        prediction has arrived."""
        rid = request.request_id
        self.stats.extra["probes_past_k"] += 1
        exit_rule = self.config.probe_exit
        if exit_rule == "continue":  # (the room it leaves in the lane is used at the next event)
            del self._probing[rid]
            return
        self._event = True
        if exit_rule == "evict":
            self._exiting[rid] = request
            return
        if not queued:
            self.running.remove(request)
            self._generating.discard(rid)
            self._allocation_target.pop(rid, None)
            self._push_gt(request)
        self._paused.add(rid)
        self.stats.extra["probe_pauses"] += 1

    def _exit_probes(self, decision: SchedulerDecision) -> None:
        """``probe_exit="evict"``: each probe at ``k`` tokens, in GT-key order, goes on as a plain
        request if the occupancy curve admits its remaining term (it holds what it holds and
        grows ``A - k`` tokens from now) with the lane's unused part included (it is in the lane
        already, as a paused probe that resumes), or nothing else is in flight, and
        ``max_num_seqs`` allows; else it is evicted: preempted by recompute into the PT queue
        (:meth:`_preempt`), where it is no longer eligible to probe."""
        exiting = sorted(self._exiting.values(), key=lambda r: self.gt_key(r))
        members, flight = self._flight_terms()
        for request in exiting:
            rid = request.request_id
            position = next(i for i, r in enumerate(members) if r.request_id == rid)
            del self._probing[rid]  # its full term from now on (and its lane room unused)
            alone = len(members) == 1
            admitted = (alone or self._remaining_term_admits(request, flight, position)) and (
                request in self.running or len(self.running) < self.max_num_seqs)
            del self._exiting[rid]
            if admitted:
                continue
            self._gt_queue = [entry for entry in self._gt_queue if entry[2].request_id != rid]
            self.stats.extra["probe_evictions"] += 1
            self._preempt(request, decision)
            members, flight = self._flight_terms()

    def _refined_by_k(self, request: Request) -> bool:
        """Will the executor refine ``request``'s prediction by ``k`` tokens (``refine_after_tokens <= k``)?"""
        refine_at = request.refine_after_tokens
        return refine_at is not None and refine_at <= self.config.probe_output_tokens

    def _probe_eligible(self, request: Request) -> bool:
        """A PT may start as a probe if the executor will refine its prediction by ``k`` tokens
        and it has not yet generated ``k`` tokens (a preempted probe may probe again; a request
        admitted further may not)."""
        return self._refined_by_k(request) and request.num_output_tokens < self.config.probe_output_tokens

    def _lane_blocks(self) -> int:
        """The probe lane: ``probe_share`` of the KV blocks once the first request refined by
        ``k`` has arrived, else none (an executor without refinement never probes) [blocks]."""
        return int(self.config.probe_share * self.kv_cache.num_blocks) if self._lane_open else 0

    def _lane_used_blocks(self, excluded: Request | None = None) -> int:
        """The probe sizes of the probes (running or paused) but ``excluded`` [blocks]."""
        kv = self.kv_cache
        return sum(kv.blocks_for(self._probe_tokens(r)) for r in self._probing.values() if r is not excluded)

    def _probe_tokens(self, request: Request) -> int:
        """A probe's size: its prompt and ``k`` generated tokens, less the last sampled one [tokens]."""
        return request.num_prompt_tokens + self.config.probe_output_tokens - 1

    def _start_probes(self, start: int, budget: int, decision: SchedulerDecision) -> None:
        """Start PTs from index ``start`` of the PT queue on, in queue order, as probes in the
        probe lane (see the module docstring): skipping PTs not eligible (:meth:`_probe_eligible`),
        stopping at the first whose probe size does not fit in the lane's unused part or whose
        prompt does not fit in the free pool. Nothing without an open lane (:meth:`_lane_blocks`)."""
        if not self._lane_open:
            return
        kv = self.kv_cache
        share_left = self._lane_blocks() - self._lane_used_blocks()
        for entry in (e for e in self._pt_queue[start:] if self._probe_eligible(e[2])):  # lazy: most stop early
            if budget <= 0:
                self._pt_waits_for_budget = True
                return
            if len(self.running) >= self.max_num_seqs:
                return
            request = entry[2]
            size = kv.blocks_for(self._probe_tokens(request))
            prompt_blocks = kv.blocks_for(request.num_pending_tokens)
            recompute = request.num_output_tokens > 0
            room = kv.num_free_blocks + (kv.num_global_reserve_free if recompute else 0)
            if size > share_left or prompt_blocks > room:
                return
            share_left -= size
            self._probing[request.request_id] = request
            self.stats.extra["probes"] += 1
            budget -= self._start_prompt(self._pt_queue.index(entry), budget, decision, recompute)

    def _resume_paused(self, key_limit: float | None) -> None:
        """Admit paused probes further in GT-key order, those with a key at most ``key_limit``
        (``None``: all), stopping at the first refused (see :meth:`_resume`)."""
        members, flight = self._flight_terms()
        position = {r.request_id: i for i, r in enumerate(members)}
        while (entry := self._first_paused()) is not None and (key_limit is None or entry[0] <= key_limit):
            if not self._resume(entry, flight, position):
                return

    def _first_paused(self) -> tuple[float, int, Request] | None:
        """The GT-queue entry of the paused probe with the smallest key (``None`` if none)."""
        return next((e for e in self._gt_queue if e[2].request_id in self._paused), None)

    def _resume(self, entry: tuple[float, int, Request], flight: list[np.ndarray], position: dict[int, int]) -> bool:
        """Admit the paused probe of GT-queue ``entry`` further if ``max_num_seqs`` allows and
        the occupancy curve admits its remaining term (it holds what it holds and grows for
        ``A - k`` steps from now), or nothing runs; returns whether it was."""
        request = entry[2]
        rid = request.request_id
        if len(self.running) >= self.max_num_seqs:
            return False
        if self.running and not self._remaining_term_admits(request, flight, position[rid]):
            return False
        self._gt_queue.remove(entry)
        self._paused.discard(rid)
        del self._probing[rid]
        self.stats.extra["probe_resumes"] += 1
        self._start_generation(request, next(self._groups))
        return True

    def _remaining_term_admits(self, request: Request, flight: list[np.ndarray], position: int) -> bool:
        """Would the curve admit the probe at ``position`` of ``flight`` (paused, or at ``k``
        tokens) with its remaining term instead of its hold term? Its remaining term: it holds
        what it holds and grows for ``A - g`` steps from now. Replaces the term in ``flight``
        when it would."""
        kv = self.kv_cache
        life = max(1, self.allocated_output_tokens(request) - request.num_output_tokens)
        term = [column.copy() for column in flight]
        for column, value in zip(term, (0, request.num_computed_tokens, life, kv.held_blocks(request.request_id))):
            column[position] = value
        others = kv.num_committed_blocks - int(flight[3].sum())
        if not kv.occupancy_fits(*term, self._curve_capacity_blocks(request) - others, horizon_steps=life):
            return False
        flight[:] = term
        return True

    def _victim_paused(self) -> Request | None:
        """The paused probe with the largest GT key (``None`` if none is paused)."""
        return next((e[2] for e in reversed(self._gt_queue) if e[2].request_id in self._paused), None)

    # ------------------------------------------------------------------ one step
    def _score_finished(self, now_s: float) -> None:
        """Score the requests finished since the last step against their SLO (finished by
        ``now_s`` within :meth:`_deadline_s` for the true output length) into the promotion
        gate's window."""
        window = self._slo_met
        for request in self._finished_unscored:
            met = now_s <= self._deadline_s(request, request.num_output_tokens)
            if len(window) == window.maxlen:
                self._slo_met_count -= window[0]
            window.append(met)
            self._slo_met_count += met
        self._finished_unscored.clear()

    def _promotion_open(self, now_s: float) -> bool:
        """Promotion applies now: every gate set is open (the attainment gate: a full window,
        ``promotion_window``, with SLO attainment at least ``promotion_attainment``; the idle
        gate: an idle share of the last ``promotion_idle_window_s`` at least
        ``promotion_idle_share``)."""
        if self._gates_promotion:
            window = self._slo_met
            if not (len(window) == window.maxlen
                    and self._slo_met_count >= self.config.promotion_attainment * window.maxlen):
                return False
        return not self._gates_on_idle or self._idle_share(now_s) >= self.config.promotion_idle_share

    def _note_idle(self, now_s: float) -> None:
        """Close the idle stretch that ends at this call, if one is open, and drop those that
        ended before the idle gate's window."""
        if self._idle_since_s is not None:
            self._idle.append((self._idle_since_s, now_s))
            self._idle_since_s = None
        horizon_s = now_s - self.config.promotion_idle_window_s
        while self._idle and self._idle[0][1] <= horizon_s:
            self._idle.popleft()

    def _idle_share(self, now_s: float) -> float:
        """Share of the last ``promotion_idle_window_s`` the engine stood idle."""
        window_s = self.config.promotion_idle_window_s
        horizon_s = now_s - window_s
        return sum(end - max(start, horizon_s) for start, end in self._idle) / window_s

    def _prune_promotions(self) -> None:
        """While the gate is shut, due promotions stay in the heap: drop those of PTs no longer
        queued once they outnumber the queue twice over, plus :data:`PRUNE_SLACK_ENTRIES` (the
        heap stays O(queue), amortized O(1) a PT)."""
        if len(self._promotions) > 2 * len(self._pt_queue) + PRUNE_SLACK_ENTRIES:
            queued = {id(entry) for entry in self._pt_queue}
            self._promotions = [p for p in self._promotions if id(p[2]) in queued]
            heapq.heapify(self._promotions)

    @property
    def _releases_cap(self) -> bool:
        """The slowdown cap binds and may be released (``slowdown_cap_release_wait_s``)."""
        return self._released_blocks > self._capped_blocks

    def _oldest_unstarted_arrival_s(self) -> float:
        """Arrival of the longest-waiting queued PT without a first token [s]; ``inf`` if none.
        Entries of PTs that have started since are dropped here (a PT preempted before its
        first token is pushed again)."""
        heap = self._unstarted
        while heap and not (heap[0][2].status == RequestStatus.WAITING and heap[0][2].num_output_tokens == 0):
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def _release_cap(self, now_s: float) -> None:
        """Release the slowdown cap while a PT waits ``slowdown_cap_release_wait_s`` without a
        first token; restore it once none does and the KV held fits the capped cache (until then
        :attr:`_cap_draining` holds admissions). Like promotion, the release is not an event (a
        bulk stretch of decode steps never asks the clock): admissions use the larger cache from
        the policy's next invocation on (an arrival, a finish, a prompt done)."""
        kv = self.kv_cache
        if self._oldest_unstarted_arrival_s() <= now_s - self.config.slowdown_cap_release_wait_s:
            self._cap_draining = False
            if kv.num_blocks < self._released_blocks:
                kv.resize(self._released_blocks)
                self.stats.extra["cap_releases"] += 1
        elif kv.num_blocks > self._capped_blocks:
            restored = kv.resize(self._capped_blocks)
            self._cap_draining = not restored
            self._event |= restored  # admissions waited for it

    def _schedule(self, now_s: float) -> SchedulerDecision:
        if self._gates_on_idle:
            self._note_idle(now_s)
            self._step_start_s = now_s
        if self._finished_unscored:
            self._score_finished(now_s)
        if self._promotions and self._event:  # the order counts at admissions, which events start
            if self._promotion_open(now_s):
                self._promote_waiting(now_s)
            else:
                self._prune_promotions()
        if self.config.no_syncdecoupled:
            return self._schedule_coupled(now_s)
        if self._releases_cap:
            self._release_cap(now_s)
        decision = SchedulerDecision()
        if self._exiting:
            self._exit_probes(decision)
        invoke = self._event and bool(self._pt_queue or self._gt_queue)
        if invoke:
            self._event = False
            self._admit_generation_groups(decision)
        self._schedule_generation(decision)
        budget = self._prompt_budget(decision.num_decode_tokens)
        budget = self._schedule_prompt_chunks(budget, decision)
        if self._pt_queue and budget > 0 and (invoke or self._pt_waits_for_budget):
            invoke = True
            self._admit_prompts(budget, decision, now_s)
        if decision.is_empty and not self.running and self._gt_queue:
            invoke = True
            self._evict_for_head(decision)
        decision.invoked = invoke or bool(decision.preempted)
        return decision

    def _admit_generation_groups(self, decision: SchedulerDecision) -> None:
        """Time-synced admission: groups of same-bucket GTs, in priority order, each GT with its
        exact allocation from the free pool, or by KVCPipe from a running host's idle tail."""
        kv = self.kv_cache
        if self._paused:  # those ahead of every PT (the rest compete with PTs in _admit_prompts); all
            # in key order when nothing runs (the first then resumes whatever the curve says)
            self._resume_paused(self._pt_queue[0][0] if self._pt_queue and self.running else None)
        buckets: dict[int, list[tuple[float, int, Request]]] = {}
        for entry in self._gt_queue:
            if entry[2].request_id in self._paused:
                continue  # a paused probe: admitted further only by _resume_paused
            buckets.setdefault(self.rl_bucket_of(entry[2]), []).append(entry)
        admitted: set[int] = set()
        blocked = False
        for members in buckets.values():
            group = next(self._groups)
            grouped = 0
            for entry in members:
                if len(self.running) >= self.max_num_seqs:
                    break
                request = entry[2]
                need = kv.growth_blocks_needed(request.request_id, self.exact_allocation_tokens(request))
                if self._pipelined:
                    pass  # counted in the occupancy curve since its PT was admitted; KV as used
                elif need == 0 or (not blocked and need <= kv.num_free_blocks):
                    if need:
                        decision.kv_reservations[request.request_id] = kv.reserve(
                            request.request_id, self.exact_allocation_tokens(request))
                elif not self.config.no_kvcpipe and self._borrow(request, need, decision):
                    pass
                elif not blocked and self._curve_admits(request):
                    reserved = kv.reserve(request.request_id, request.num_computed_tokens
                                          + kv.num_free_blocks * kv.block_size)
                    if reserved:
                        decision.kv_reservations[request.request_id] = reserved
                    self.stats.extra["curve_admissions"] += 1
                else:
                    blocked = True
                    continue
                self._start_generation(request, group)
                admitted.add(request.request_id)
                grouped += 1
            if grouped:
                self.stats.extra["groups_formed"] += 1
        if admitted:
            self._gt_queue = [e for e in self._gt_queue if e[2].request_id not in admitted]

    def _start_generation(self, request: Request, group: int) -> None:
        self._allocation_target[request.request_id] = self.exact_allocation_tokens(request)
        self._generating.add(request.request_id)
        self._group_of[request.request_id] = group
        self.stats.extra["gt_admissions"] += 1
        self._admit(request)

    def _borrow(self, guest: Request, need: int, decision: SchedulerDecision) -> bool:
        """KVCPipe: lend ``need`` blocks [blocks] of a host's idle tail to ``guest`` if the guest's
        padded remaining generation ends before the host would need them; best fit host."""
        if need <= 0:
            return False
        kv = self.kv_cache
        block = kv.block_size
        guest_steps = self.allocated_output_tokens(guest) - guest.num_output_tokens
        best: Request | None = None
        best_reserved = 0
        for host in self.running:
            rid = host.request_id
            if rid not in self._generating or kv.lender_of(rid) is not None:
                continue
            reserved = kv.reserved_blocks(rid)
            if reserved < need or (best is not None and reserved >= best_reserved):
                continue
            steps_on_own = (kv.allocated_blocks(rid) + reserved - need) * block - host.num_computed_tokens
            if guest_steps <= steps_on_own:
                best, best_reserved = host, reserved
        if best is None:
            return False
        kv.lend(best.request_id, guest.request_id, need)
        decision.kv_reservations[guest.request_id] = need
        self.stats.extra["kvcpipe_loans"] += 1
        return True

    def _curve_admits(self, request: Request) -> bool:
        """Generalised KVCPipe: would the predicted KV occupancy [blocks] of every generating GT,
        plus ``request`` and everything else held, stay within the cache less the global reserve
        at every future step? A GT holds max(its held blocks, blocks of its cached tokens) until
        its padded prediction runs out, then nothing."""
        if self.config.no_kvcpipe or self.config.kvcpipe != "curve":
            return False
        kv = self.kv_cache
        block = kv.block_size
        generating = [r for r in self.running if r.request_id in self._generating]
        rid = request.request_id
        cached = np.array([r.num_computed_tokens for r in generating] + [request.num_computed_tokens], dtype=np.int64)
        held = np.array([kv.allocated_blocks(r.request_id) + kv.reserved_blocks(r.request_id) for r in generating]
                        + [0], dtype=np.int64)
        remaining = np.array(
            [max(1, self.allocated_output_tokens(r) - r.num_output_tokens) for r in generating]
            + [max(1, self.allocated_output_tokens(request) - request.num_output_tokens)], dtype=np.int64)
        others = kv.num_committed_blocks - int(held.sum()) - kv.allocated_blocks(rid) - kv.reserved_blocks(rid)
        held[-1] = kv.allocated_blocks(rid) + kv.reserved_blocks(rid)
        horizon = remaining[-1]
        steps = np.unique(np.append(np.minimum(remaining, horizon), horizon))[:, None]
        occupancy = np.where(remaining[None, :] >= steps, np.maximum(held[None, :], -(-(cached[None, :] + steps) // block)), 0)
        capacity = kv.num_blocks - kv.global_reserve_blocks
        return bool((others + occupancy.sum(axis=1) <= capacity).all())

    def _schedule_generation(self, decision: SchedulerDecision) -> None:
        """One token for every generating GT; extension from the reserve, then the free pool,
        then preemption (the grower's guests, then the lowest-priority GT)."""
        gts = [r for r in self.running if r.request_id in self._generating]
        store_tokens = self.kv_cache.store_tokens
        for request in gts:
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this pass
            if not store_tokens(request.request_id, request.num_computed_tokens + 1):  # not within its blocks
                self._grow(request, decision)
        decision.add_decodes([r for r in gts if r.status == RequestStatus.RUNNING])
        for victim in decision.preempted:
            decision.kv_allocations.pop(victim.request_id, None)

    def _grow(self, request: Request, decision: SchedulerDecision) -> None:
        kv = self.kv_cache
        rid = request.request_id
        target = request.num_computed_tokens + 1
        while True:
            if kv.growth_blocks_needed(rid, target) == 0:
                self._allocate(request, 1, decision)
                return
            reserve_before = kv.num_global_reserve_used
            # beyond its exact allocation, or a host whose guest over-ran: a misprediction
            # (every guest holding a loan is running: a guest's loan ends when it is freed)
            mispredicted = target > self._allocation_target.get(rid, 0) or kv.is_lender(rid)
            new = kv.allocate_slots(rid, target, use_global_reserve=True, global_reserve_first=mispredicted)
            if new is not None:
                from_reserve = kv.num_global_reserve_used - reserve_before
                if mispredicted:
                    self.stats.extra["reserve_extension_blocks"] += from_reserve
                    self.stats.extra["free_extension_blocks"] += new - from_reserve
                else:  # the deferred part of a curve admission's allocation
                    self.stats.extra["deferred_allocation_blocks"] += new
                decision.kv_allocations[rid] = decision.kv_allocations.get(rid, 0) + new
                return
            victim = self._victim_for(request)
            self._preempt(victim, decision)
            if victim is request:
                return

    def _victim_for(self, grower: Request) -> Request:
        """Who is preempted when ``grower`` finds no block: its own KVCPipe guests first; a
        guest that over-runs its loan preempts itself (a host never pays for its guest); else the
        generating GT (the grower included) with the largest GT key (lowest priority), least
        progress on ties, among those preempted fewer than ``repeat_victim_limit`` times if any."""
        kv = self.kv_cache
        paused = self._victim_paused() if self._paused else None
        if paused is not None:
            return paused
        generating = [r for r in self.running if r.request_id in self._generating]
        guests = [r for r in generating if kv.lender_of(r.request_id) == grower.request_id]
        if not guests and kv.lender_of(grower.request_id) is not None:
            return grower
        candidates = guests or generating
        limit = self.config.repeat_victim_limit
        if limit is not None:
            candidates = [r for r in candidates if r.num_preemptions < limit] or candidates
        return max(candidates, key=lambda r: (self._gt_key.get(r.request_id, 0.0), -r.num_output_tokens))

    def _schedule_prompt_chunks(self, budget: int, decision: SchedulerDecision) -> int:
        """Next chunk of every admitted PT within ``budget`` [tokens]; returns what is left.
        (Running requests that are decoding were scheduled, or left out, by the decode pass.)"""
        if len(self.running) == len(self._generating):
            return budget  # every running request is a generating GT (each is in running): no PT
        for request in self.running:
            if budget <= 0:
                break
            if request.is_decoding:
                continue
            num_new = min(request.num_pending_tokens, budget)
            if not self._allocate(request, num_new, decision):
                raise RuntimeError(f"econoserve: PT {request.request_id} lost its prompt reservation")
            decision.add(request, num_new)
            budget -= num_new
        return budget

    def _pipeline_growth_blocks(self) -> int:
        """Blocks the PTs and queued GTs will still need for their exact allocations."""
        kv = self.kv_cache
        total = 0
        for request in itertools.chain(
            (r for r in self.running if r.request_id not in self._generating), (e[2] for e in self._gt_queue)
        ):
            total += kv.growth_blocks_needed(request.request_id, self.exact_allocation_tokens(request))
        return total

    def _kept_free_blocks(self) -> int:
        """Free blocks a PT admission must leave untouched [blocks]: with ``lookahead``, the
        growth every PT and queued GT still needs for its exact allocation; with ``prompt``,
        only the growth the GT queue's head still needs (so new prompts cannot starve it)."""
        if self._pipelined:
            return 0
        if self._lookahead:
            return self._pipeline_growth_blocks()
        if not self._gt_queue:
            return 0
        head = self._gt_queue[0][2]
        return self.kv_cache.growth_blocks_needed(head.request_id, self.exact_allocation_tokens(head))

    def _flight_terms(self) -> tuple[list[Request], list[np.ndarray]]:
        """Everything in flight and its predicted occupancy terms (see
        :meth:`KVCache.occupancy_peak_blocks`): start [steps], base [tokens], lifetime [steps],
        held [blocks] per GT (generating or queued: start 0, base = cached tokens) and per PT
        (base = its tokens when its prompt is done, start = the steps until then, from the prompt
        tokens ahead of it in chunk order and its own over the budget left by decodes). A probe
        (running or paused) has a hold term instead: ``blocks_for(prompt + k - 1)`` from now on."""
        kv = self.kv_cache
        generating = self._generating
        gts: list[Request] = []
        pts: list[Request] = []
        for request in self.running:
            (gts if request.request_id in generating else pts).append(request)
        gts += [entry[2] for entry in self._gt_queue]
        per_step = max(1, self._prompt_budget(len(gts)))
        ahead = np.cumsum([r.num_pending_tokens for r in pts], dtype=np.int64)
        start = [0] * len(gts) + (-(-ahead // per_step)).tolist() if self.config.prefill_delay else [0] * (len(gts) + len(pts))
        base = [r.num_computed_tokens for r in gts] + [r.num_tokens for r in pts]
        members = gts + pts
        allocated = self.allocated_output_tokens
        lifetime = [max(1, allocated(r) - r.num_output_tokens) for r in members]
        held = [kv.held_blocks(r.request_id) for r in members]
        if self._probing:
            for i, request in enumerate(members):
                if request.request_id in self._probing:
                    start[i], base[i], lifetime[i] = HOLD_START_STEPS, self._probe_tokens(request), 1
        return members, [np.asarray(column, dtype=np.int64) for column in (start, base, lifetime, held)]

    def _flight_admits(self, request: Request, flight: list[np.ndarray]) -> bool:
        """KVCPipe for every request: would the predicted occupancy of everything in flight and the
        PT ``request`` (queued behind the PTs in flight) peak, within ``request``'s predicted
        life, at most at the cache less the global reserve, times ``1 + overbooking``? Appends
        ``request``'s term to ``flight`` when it would."""
        kv = self.kv_cache
        start, base, lifetime, held = flight
        pending = request.num_pending_tokens
        if self.config.prefill_delay:
            num_gts = len(self._generating) + len(self._gt_queue)
            per_step = max(1, self._prompt_budget(num_gts))
            ahead = sum(r.num_pending_tokens for r in self.running if r.request_id not in self._generating)
            delay = -(-(ahead + pending) // per_step)
        else:
            delay = 0
        life = max(1, self.allocated_output_tokens(request) - request.num_output_tokens)
        prompt_blocks = kv.blocks_for(request.num_tokens)  # what its admission reserves
        term = [np.append(column, value) for column, value in zip(flight, (delay, request.num_tokens, life, prompt_blocks))]
        others = kv.num_committed_blocks - int(held.sum())
        if start.size and not kv.occupancy_fits(*term, self._curve_capacity_blocks(request) - others,
                                                horizon_steps=delay + life):
            return False
        flight[:] = term
        return True

    def _curve_capacity_blocks(self, candidate: Request) -> int:
        """The most blocks the occupancy curve admits when ``candidate`` asks to start: the cache
        less the reserve, times ``1 + overbooking``, less the probe lane's unused part unless
        ``candidate`` is a probe in the lane at ``k`` tokens (paused or exiting) [blocks]."""
        kv = self.kv_cache
        capacity = int((kv.num_blocks - self._curve_reserve_blocks(candidate)) * (1.0 + self.config.overbooking))
        in_lane = candidate.request_id in self._paused or candidate.request_id in self._exiting
        if self._lane_open and not in_lane:  # the lane's unused part
            capacity -= max(0, self._lane_blocks() - self._lane_used_blocks(excluded=candidate))
        return capacity

    def _curve_reserve_blocks(self, candidate: Request) -> int:
        """The reserve the occupancy curve keeps free when ``candidate`` asks to start [blocks]:
        the fixed global reserve, or with ``reserve_rule="overrun"`` the expected over-run of
        every request in flight (PTs, queued and generating GTs) and the candidate beyond its
        allocation, by its predicted distribution given what it has generated (see the module
        docstring)."""
        kv = self.kv_cache
        if self.config.reserve_rule != "overrun":
            return kv.global_reserve_blocks
        flight = itertools.chain(self.running, (entry[2] for entry in self._gt_queue), (candidate,))
        tokens = sum(expected_overrun_tokens(r.predicted_output_quantiles, self.allocated_output_tokens(r),
                                             r.num_output_tokens) for r in flight)
        return -(-int(math.ceil(tokens)) // kv.block_size)

    @property
    def _lookahead(self) -> bool:
        """Look-ahead PT admission (it needs exact allocations: not without SyncDecoupled)."""
        return self.config.prompt_admission == "lookahead" and not self.config.no_syncdecoupled

    def _next_pt(self, now_s: float) -> int:
        """Index in the PT queue of the PT to start next: the head, or with ``late_demotion_s``
        the first whose latest start by SLO slack alone is at most that far in the past (late PTs
        yield to any PT that can still meet its estimated deadline; the head when every PT is
        late). O(queue) with the knob on: the queue is sorted by key, not by slack."""
        late = self.config.late_demotion_s
        if late is None or self.config.no_ordering:
            return 0
        for index, entry in enumerate(self._pt_queue):
            if self._slack_start_s(entry[2]) >= now_s - late:
                return index
        return 0

    def _next_backfill(self, start: int) -> int | None:
        """Index of the first PT from ``start`` on whose allocation is at most
        ``backfill_output_tokens`` (``None`` if there is none)."""
        limit = self.config.backfill_output_tokens
        for index in range(start, len(self._pt_queue)):
            if self.allocated_output_tokens(self._pt_queue[index][2]) <= limit:
                return index
        return None

    def _admit_prompts(self, budget: int, decision: SchedulerDecision, now_s: float) -> None:
        """Start PTs in priority order (see :meth:`_next_pt`) while the budget, ``max_num_seqs``
        and the KV rule of ``prompt_admission`` allow (see the module docstring), none while the
        released slowdown cap drains; the first chunk runs in this step."""
        if self._cap_draining:
            return
        kv = self.kv_cache
        lookahead = self._lookahead
        committed = self._kept_free_blocks()
        members, flight = self._flight_terms() if self._pipelined else ((), None)
        position = {r.request_id: i for i, r in enumerate(members)} if self._paused else {}
        self._pt_waits_for_budget = False
        backfill_from = None  # set once the curve refused a PT: only short PTs behind it may start
        while self._pt_queue:
            if budget <= 0:
                self._pt_waits_for_budget = True
                return
            if len(self.running) >= self.max_num_seqs:
                return
            index = self._next_pt(now_s) if backfill_from is None else self._next_backfill(backfill_from)
            if index is None:
                return
            paused = self._first_paused() if self._paused else None
            if paused is not None and paused[0] <= self._pt_queue[index][0]:  # merged key order
                if not self._resume(paused, flight, position):
                    return self._start_probes(index, budget, decision)
                continue
            request = self._pt_queue[index][2]
            prompt_blocks = kv.blocks_for(request.num_pending_tokens)
            own_growth = kv.blocks_for(self.exact_allocation_tokens(request)) - prompt_blocks if lookahead else 0
            # a preempted GT outgrew its prediction: its recompute may draw on the global reserve
            recompute = request.num_output_tokens > 0
            room = kv.num_free_blocks + (kv.num_global_reserve_free if recompute else 0)
            if prompt_blocks + max(0, own_growth) + committed > room:
                if backfill_from is None:
                    return self._start_probes(index, budget, decision)
                backfill_from = index + 1
                continue
            if flight is not None and not self._flight_admits(request, flight):
                if self.config.backfill_output_tokens is None:
                    return self._start_probes(index, budget, decision)
                backfill_from = index + 1
                continue
            if backfill_from is not None:
                backfill_from = index
                self.stats.extra["backfills"] += 1
            committed += max(0, own_growth)
            budget -= self._start_prompt(index, budget, decision, recompute)

    def _start_prompt(self, index: int, budget: int, decision: SchedulerDecision, recompute: bool) -> int:
        """Start the PT at ``index`` of the PT queue: reserve KV for its pending tokens (a
        ``recompute`` may draw on the global reserve) and schedule its first chunk within
        ``budget``; returns the chunk [tokens]."""
        request = self._pt_queue.pop(index)[2]
        rid = request.request_id
        reserved = self.kv_cache.reserve(rid, request.num_pending_tokens, use_global_reserve=recompute)
        if reserved:
            decision.kv_reservations[rid] = reserved
        num_new = min(request.num_pending_tokens, budget)
        self._allocate(request, num_new, decision)
        self._admit(request)
        decision.add(request, num_new)
        return num_new

    def _evict_for_head(self, decision: SchedulerDecision) -> None:
        """Nothing runs and the GT queue's head cannot get its allocation: send the lowest
        priority queued GTs back to the PT queue (their KV freed) until the head fits."""
        kv = self.kv_cache
        head = self._gt_queue[0][2]
        while len(self._gt_queue) > 1:
            need = kv.growth_blocks_needed(head.request_id, self.exact_allocation_tokens(head))
            if need <= kv.num_free_blocks:
                break
            victim = self._gt_queue.pop()[2]
            self.stats.extra["gt_evictions"] += 1
            self._preempt(victim, decision)
        self._event = True

    def _preempt(self, request: Request, decision: SchedulerDecision) -> None:
        """Preempt by recompute: free the KV and return the request to the PT queue (a probe,
        paused or not, as a plain PT)."""
        rid = request.request_id
        if rid in self._paused:
            self._gt_queue = [entry for entry in self._gt_queue if entry[2].request_id != rid]
            self._paused.discard(rid)
            self.stats.extra["paused_preemptions"] += 1
        self._probing.pop(rid, None)
        if request.status == RequestStatus.RUNNING and request in self.running:
            self.running.remove(request)
        self.kv_cache.free(request.request_id)
        self._generating.discard(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self._push_pt(request)
        decision.preempted.append(request)
        self._event = True

    # ------------------------------------------------------------------ ablation: coupled
    def _schedule_coupled(self, now_s: float) -> SchedulerDecision:
        """Without SyncDecoupled: one queue, decodes first, prompt chunks under the budget, KV on
        demand; a preemption takes the lowest-priority running request. Decides every step."""
        decision = SchedulerDecision()
        decoding = [r for r in self.running if r.is_decoding][:self.token_budget]
        for request in decoding:
            while request.status == RequestStatus.RUNNING and not self._allocate(request, 1, decision):
                victim = max(self.running, key=lambda r: (self.pt_key(r), -r.num_output_tokens))
                self._preempt(victim, decision)
        for request in decoding:
            if request.status == RequestStatus.RUNNING:
                decision.add(request, 1)
        for victim in decision.preempted:
            decision.kv_allocations.pop(victim.request_id, None)
        budget = self._schedule_prompt_chunks(self._prompt_budget(decision.num_decode_tokens), decision)
        if budget > 0:
            self._admit_prompts(budget, decision, now_s)
        return decision

    # ------------------------------------------------------------------ skip-ahead
    def steady_decode_steps(self, decision: SchedulerDecision, max_steps: int) -> int:
        """As :meth:`Policy.steady_decode_steps`; with ``kvcpipe="all"`` growth comes from the
        free pool, so a bulk stretch may take free blocks, but no GT may pass its allocation
        target in it (beyond it, growth draws on the global reserve first)."""
        if self._pipelined:
            targets = self._allocation_target
            for request in self.running:
                max_steps = min(max_steps, targets.get(request.request_id, 0) - request.num_computed_tokens)
                if request.request_id in self._probing:  # the step that reaches k is a full step
                    max_steps = min(max_steps, self.config.probe_output_tokens - 1 - request.num_output_tokens)
                if max_steps <= 0:
                    return 0  # (what the base class answers for no steps)
        return super().steady_decode_steps(decision, max_steps)

    def _steady_free_margin(self) -> int:
        # SyncDecoupled: a bulk stretch may not extend any GT beyond what it holds (extensions
        # draw on the global reserve first, which the bulk update does not model).
        return 0 if self.config.no_syncdecoupled or self._pipelined else self.kv_cache.num_free_blocks

    def describe(self) -> dict[str, object]:
        described = super().describe()
        described["global_reserve_blocks"] = self.kv_cache.global_reserve_blocks
        described["used_kv_blocks"] = self._capped_blocks  # the cache, or less under the slowdown cap
        if self._releases_cap:
            described["released_kv_blocks"] = self._released_blocks
        return described


def gittins_rank_tokens(points: tuple[int, ...] | list[int]) -> float:
    """The Gittins rank at zero attained service of a length distribution given as equally likely
    ``points`` [tokens]: ``min over D of E[min(S, D)] / P(S <= D)`` (the expected service per
    chance of completing within ``D``; the Gittins index is its inverse), ``D`` ranging over the
    points. A point mass at ``L`` has rank ``L``; a spread distribution ranks below its mean when
    it holds a good chance of ending early."""
    ordered = np.sort(np.asarray(points, dtype=np.float64))
    count = ordered.size
    index = np.arange(count)
    expected_min = (np.cumsum(ordered) + (count - index - 1) * ordered) / count
    return float(np.min(expected_min * count / (index + 1)))


def expected_overrun_tokens(points: tuple[int, ...] | None, allocated: int, generated: int) -> float:
    """Expected tokens a request generates beyond ``allocated`` [tokens], by its predicted
    distribution (equally likely ``points``) given that it has generated ``generated`` tokens
    (points at or below ``generated`` are impossible); 0 without a distribution, or when every
    point is at or below ``generated`` (the request outgrew its distribution: its allocation
    already steps a bucket at a time)."""
    if points is None:
        return 0.0
    alive = [p for p in points if p > generated]
    return sum(max(0, p - allocated) for p in alive) / len(alive) if alive else 0.0


class _EconoServeAblation(EconoServePolicy):
    """EconoServe with some switches forced on (the ablation scheduler names)."""

    forced: dict[str, bool] = {}

    def __init__(self, limits: EngineLimits, config: EconoServeConfig | None = None) -> None:
        super().__init__(limits, replace(config or EconoServeConfig(), **self.forced))


class EconoServeNoKVCPipePolicy(_EconoServeAblation):
    """EconoServe without KVCPipe (idle tails of exact allocations are never lent)."""

    name = "econoserve-no-kvcpipe"
    forced = {"no_kvcpipe": True}


class EconoServeNoOrderingPolicy(_EconoServeAblation):
    """EconoServe with FCFS PT and GT queues."""

    name = "econoserve-no-ordering"
    forced = {"no_ordering": True}


class EconoServeNoSyncDecoupledPolicy(_EconoServeAblation):
    """EconoServe without SyncDecoupled: coupled PT/GT, KV on demand (vLLM-like admission)."""

    name = "econoserve-no-syncdecoupled"
    forced = {"no_syncdecoupled": True}


class EconoServeOraclePolicy(_EconoServeAblation):
    """EconoServe with the true response length as its prediction."""

    name = "econoserve-oracle"
    forced = {"oracle_rl": True}


#: EconoServe and its ablations, for the policy registry.
ECONOSERVE_POLICIES: tuple[type[EconoServePolicy], ...] = (
    EconoServePolicy,
    EconoServeNoKVCPipePolicy,
    EconoServeNoOrderingPolicy,
    EconoServeNoSyncDecoupledPolicy,
    EconoServeOraclePolicy,
)
