"""Per-request sampling parameters and a batched sampler whose rows never influence each other.

Each row has its own params and its own `torch.Generator`: the rows are transformed as one batch, and each
sampling row draws one uniform number from its generator on the CPU (inverse CDF), so a request with a seed
gets the same tokens whether it runs alone or next to any other requests.
Order per row: penalties on the raw logits -> temperature (0 = argmax) -> top-k -> top-p -> min-p -> draw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from astrai_ds.errors import RequestError

MAX_LOGPROBS = 20
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0  # repetition_penalty's range
GREEDY_EPS = 1e-5  # a temperature below this is greedy: dividing by it would overflow the logits to inf


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256  # > 0; 0 with prompt_logprobs: the prompt is computed and scored, nothing generated
    temperature: float = 1.0  # >= 0; 0 means greedy (argmax of the penalised logits)
    top_k: int = 0  # 0 = off; else keep the k most likely tokens
    top_p: float = 1.0  # in (0, 1]: keep the smallest set of most likely tokens with mass >= top_p
    min_p: float = 0.0  # in [0, 1]: drop tokens with p < min_p * p_max
    repetition_penalty: float = 1.0  # in [0.01, 100]; HF/CTRL: over prompt and output tokens, logit > 0 -> /p, else *p
    presence_penalty: float = 0.0  # in [-2, 2]; OpenAI: minus this once for each token already in the output
    frequency_penalty: float = 0.0  # in [-2, 2]; OpenAI: minus this times the token's count in the output
    stop: list[str] = ()  # stop strings; the text is cut just before the first one
    stop_token_ids: list[int] = ()  # extra stop token ids (the engine adds eos / im_end itself)
    seed: int | None = None  # the request's own generator: same seed -> same tokens, whatever else is batched
    logprobs: int | None = None  # None: none; N: log-prob of each chosen token and its top-N alternatives
    # None: none; N: the log-prob of each prompt token after the first, given the tokens before it, and the top-N
    # alternatives at its position (the prompt is computed whole: the prefix cache is not read for it)
    prompt_logprobs: int | None = None
    ignore_eos: bool = False  # keep going past <eos> and <|im_end|> (benchmarks: fixed output lengths)

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < (self.prompt_logprobs is None):
            raise self._invalid("max_new_tokens", "an integer > 0" if self.prompt_logprobs is None else
                                "an integer >= 0 (0: the prompt alone scored, nothing generated)")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise self._invalid("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise self._invalid("top_k", "an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise self._invalid("top_p", "in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise self._invalid("min_p", "in [0, 1]")
        # bounded so that dividing or multiplying a logit by it stays finite (1e-300 overflowed them to inf)
        if not _is_number(self.repetition_penalty) or not MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise self._invalid("repetition_penalty", f"in [{MIN_PENALTY}, {MAX_PENALTY:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise self._invalid(name, "in [-2, 2]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise self._invalid("stop", "a string or a list of non-empty strings")
        if (not isinstance(self.stop_token_ids, (list, tuple))
                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)):
            raise self._invalid("stop_token_ids", "a list of integers >= 0")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise self._invalid("seed", "None or an integer in [0, 2**64)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise self._invalid("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise self._invalid("prompt_logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.ignore_eos, bool):
            raise self._invalid("ignore_eos", "true or false")
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        self.temperature, self.top_p, self.min_p = float(self.temperature), float(self.top_p), float(self.min_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.presence_penalty, self.frequency_penalty = float(self.presence_penalty), float(self.frequency_penalty)

    def _invalid(self, name: str, allowed: str) -> RequestError:
        value = getattr(self, name)
        return RequestError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """From a request's fields (a JSONL line, an HTTP body); an unknown key is an error naming it."""
        if not isinstance(d, dict):
            raise RequestError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise RequestError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                               f"known: {', '.join(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # of the chosen token under the model's raw distribution; None unless asked
    top_logprobs: list[tuple[int, float]] | None  # the top-N (token, logprob), highest first
    error: str | None = None  # set when this row's sampling failed (token_id is then -1); the other rows stand


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with a fresh random seed when `seed` is None."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                    output_ids: list[list[int]]) -> torch.Tensor:
    """A penalised copy of `logits` (B, V); only the tokens that occur in a row's context are touched."""
    logits = logits.clone()
    for row, p in enumerate(params):
        x = logits[row]  # (V,), a view: writes land in `logits`
        if p.repetition_penalty != 1.0 and (prompt_ids[row] or output_ids[row]):
            seen = torch.tensor(sorted(set(prompt_ids[row]) | set(output_ids[row])), dtype=torch.long)
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output_ids[row]:
            ids, counts = torch.tensor(output_ids[row], dtype=torch.long).unique(return_counts=True)
            x[ids] -= p.frequency_penalty * counts.to(x.dtype) + p.presence_penalty
    return logits


def filter_logits(x: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, then min-p on one row of tempered logits x (V,).

    Returns the logits sorted descending with dropped tokens at -inf, and the token id of each position.
    Top-p sees the top-k survivors renormalised; min-p needs no renormalising (it compares ratios)."""
    x, order = x.sort(descending=True)  # (V,), (V,)
    return _filter_sorted(x[None], [p])[0], order


def chosen_and_top(logprobs: torch.Tensor, chosen: list[int],
                   top_n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of log-probs (rows, vocab): the log-prob of its chosen token, and the top_n (token, log-prob)
    pairs, highest first ([] for 0): a generated token's `logprobs` and a prompt token's `prompt_logprobs` alike."""
    values = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0].tolist()
    if not top_n:
        return [(v, []) for v in values]
    top = logprobs.topk(min(top_n, logprobs.shape[1]))  # sorted, highest first
    return [(v, list(zip(ids, lps))) for v, ids, lps in zip(values, top.indices.tolist(), top.values.tolist())]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           prompt_ids: list[list[int]], output_ids: list[list[int]]) -> list[SampleResult]:
    """The next token of each row of `logits` (B, V), the last position's logits of each request.

    The rows are transformed together, each with its own params, and each sampling row draws one uniform number
    from its own generator (None: torch's default one) and takes the token where its cumulative distribution
    passes it (inverse CDF; greedy rows draw nothing). A row's token therefore depends only on its own logits,
    params and generator, not on the rows beside it. A row whose probabilities are not finite (a NaN temperature,
    overflowed logits) fails alone; should the batch's arithmetic raise, the rows are sampled one at a time so
    that only the failing one ends. Log-probs are of the raw model distribution, before penalties and
    temperature, as vLLM reports them."""
    B = logits.shape[0]
    if not len(params) == len(generators) == len(prompt_ids) == len(output_ids) == B:
        raise ValueError(f"sample: {B} rows of logits but {len(params)} params, {len(generators)} generators, "
                         f"{len(prompt_ids)} prompts and {len(output_ids)} outputs")
    # The draw runs on the CPU with each request's CPU generator, which makes it independent of the device.
    logits = logits.detach().float().cpu()  # (B, V)
    try:
        return _sample_rows(logits, params, generators, prompt_ids, output_ids)
    except Exception:  # noqa: BLE001 (nothing was drawn yet: every generator is where it was)
        results = []
        for row, p in enumerate(params):
            try:
                results += _sample_rows(logits[row:row + 1], [p], [generators[row]], [prompt_ids[row]],
                                        [output_ids[row]])
            except Exception as e:  # one request's failure ends that request, not the batch (nor the engine)
                results.append(SampleResult(-1, None, None, error=f"sampling failed: {e}"))
        return results


def _filters(p: SamplingParams) -> bool:
    return bool(p.top_k) or p.top_p < 1.0 or p.min_p > 0.0


def _filter_sorted(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then min-p on rows of tempered logits x (b, V) sorted descending, each row with its own
    params; returns x with the dropped tokens at -inf (a filter a row does not use changes nothing in that row)."""
    V = x.shape[1]
    keep = torch.arange(V)[None, :] < torch.tensor([p.top_k or V for p in params])[:, None]
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    if (top_p < 1.0).any():
        probs = x.masked_fill(~keep, -math.inf).softmax(-1)
        keep &= (probs.cumsum(-1) - probs < top_p) | (top_p >= 1.0)
        keep[:, 0] = True  # the most likely token always stays (a top_p below float32's range rounds to 0)
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    if (min_p > 0.0).any():
        probs = x.masked_fill(~keep, -math.inf).softmax(-1)
        keep &= probs >= min_p * probs[:, :1]
    return x.masked_fill(~keep, -math.inf)


def _inverse_cdf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits x (b, V): the cumulative distribution (b, V), its total (b,), whether each row is a finite
    distribution (b,), and each row's last position with any probability (b,), where a draw that rounds up to the
    total lands."""
    probs = x.softmax(-1)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    last = x.shape[1] - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)
    return cdf, total, total.isfinite() & (total > 0), last


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 prompt_ids: list[list[int]], output_ids: list[list[int]]) -> list[SampleResult]:
    """`sample` over all rows at once: penalties, then greedy rows by argmax, unfiltered sampling rows from the
    tempered softmax in token order, filtered ones (top-k, top-p, min-p) from their sorted survivors."""
    B = logits.shape[0]
    penalised = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
    x = apply_penalties(logits, params, prompt_ids, output_ids) if penalised else logits
    tokens, failed = [0] * B, [False] * B
    greedy = [r for r, p in enumerate(params) if p.greedy]
    if greedy:
        for r, t in zip(greedy, x[greedy].argmax(-1).tolist()):
            tokens[r] = t
    plain = [r for r, p in enumerate(params) if not p.greedy and not _filters(p)]
    filtered = [r for r, p in enumerate(params) if not p.greedy and _filters(p)]
    groups = []  # everything that can fail comes before the first draw, so a retry row by row draws the same
    for rows in (plain, filtered):
        if not rows:
            continue
        xs = x[rows] / torch.tensor([params[r].temperature for r in rows])[:, None]
        order = None
        if rows is filtered:
            xs, order = xs.sort(-1, descending=True)
            xs = _filter_sorted(xs, [params[r] for r in rows])
        groups.append((rows, order, *_inverse_cdf(xs)))
    for rows, order, cdf, total, finite, last in groups:
        u = torch.stack([torch.rand((), generator=generators[r]) for r in rows])  # (b,), each row's own draw
        pos = torch.minimum(torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0], last)
        pos = torch.where(finite, pos, 0)
        picked = (pos if order is None else order.gather(1, pos[:, None])[:, 0]).tolist()
        for r, t, ok in zip(rows, picked, finite.tolist()):
            tokens[r], failed[r] = t, not ok
    asked = [r for r, p in enumerate(params) if p.logprobs is not None and not failed[r]]
    lps = {}
    if asked:
        lp = logits[asked].log_softmax(-1)  # (a, V), of the raw logits
        for i, r in enumerate(asked):
            lps[r] = chosen_and_top(lp[i:i + 1], [tokens[r]], params[r].logprobs)[0]
    return [SampleResult(-1, None, None, error="sampling failed: the probabilities are not finite (check "
                                                "temperature and the penalties)") if failed[r]
            else SampleResult(tokens[r], *lps.get(r, (None, None))) for r in range(B)]
