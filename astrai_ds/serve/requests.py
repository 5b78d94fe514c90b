"""Reading a request: the base of the strict request models (unknown fields and wrong JSON types refused, lone
surrogates caught), errors that name the field the client wrote, and sampling fields turned into SamplingParams.
Shared by the OpenAI and Anthropic adapters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from astrai_ds.data.sources import lone_surrogate
from astrai_ds.errors import RequestError
from astrai_ds.inference.sampling import SamplingParams

MAX_GENERATIONS = 128  # engine requests one HTTP request may start (prompts x n)


class ApiError(Exception):
    """An HTTP error with a message for the client; each protocol renders it in its own shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Strict(BaseModel):
    """A request object: a field the server does not implement is refused, never silently ignored, and a value of
    the wrong JSON type ("2" for an integer, "yes" for a boolean) is refused, never converted."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RequestBody(Strict):
    """A route's whole body: a text with a lone surrogate anywhere in it is a 400 naming its field. Checked once,
    on the raw body before any field is parsed (the objects nested in it are plain `Strict`)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        path = lone_surrogate(data)
        if path is not None:  # an ApiError passes through pydantic to the app's handler, with the field named
            raise ApiError(400, f"'{path}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                                f"not text: send valid UTF-16 pairs or UTF-8", param=path)
        return data


BRANCHES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list[str]": "a list of strings", "list[int]": "a list of token ids", "list[list[int]]":
            "a list of token-id lists", "list[TextPart]": "a list of text parts", "list[TextBlock]":
            "a list of text blocks"}


def _is_branch(part) -> bool:
    """A location part that names a union's branch (pydantic's 'str', 'list[TextPart]'), not a field."""
    return isinstance(part, str) and (part in BRANCHES or "[" in part or part[:1].isupper() or "-" in part)


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """(param, message) of a request body's pydantic errors: the first problem, named by the field the client
    wrote (a union's branches are pydantic's, not the client's), and how many more there are."""
    def param_of(error):
        return ".".join(str(x) for x in error.get("loc", ()) if x != "body" and not _is_branch(x))

    first = errors[0]
    param = param_of(first)
    same = [e for e in errors if param_of(e) == param]
    branched = [e for e in same if any(_is_branch(x) for x in e.get("loc", ()))]
    if len(branched) > 1:  # every branch of a union refused the value itself: say what the field may be
        kinds = [BRANCHES.get(next(x for x in e["loc"] if _is_branch(x)), "") for e in branched]
        message = f"'{param}' must be {' or '.join(k for k in dict.fromkeys(kinds) if k)}"
    else:
        deeper = [e for e in errors if any(_is_branch(x) for x in e.get("loc", ())) and param_of(e) != param and
                  param_of(e).startswith(param + ".")] if branched else []
        first = deeper[0] if deeper else first  # the value had a branch's shape: its own problem inside it
        param, message = _one_message(param_of(first), first)
    more = len({param_of(e) for e in errors} - {param})
    return param, message + (f" (and {more} more problem(s))" if more else "")


def _one_message(param: str, error: dict) -> tuple[str, str]:
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "", f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind == "extra_forbidden":
        return param, f"unsupported field '{param}': this server does not implement it; remove it from the request"
    if kind == "missing" and not param:
        return "", "the request body is empty: send a JSON object (Content-Type: application/json)"
    if kind == "missing":
        return param, f"'{param}' is required"
    if kind == "model_attributes_type" and not param:
        return "", "the request body must be a JSON object"
    return param, f"'{param}': {error.get('msg', 'invalid value')}" if param else error.get("msg", "invalid request")


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams from a request's values (None: the default); a bad value is a 400 naming the field.
    `fields` keys are SamplingParams names; `_names` maps them to the request's own field names."""
    names = fields.pop("_names", {})
    given = {k: v for k, v in fields.items() if v is not None}
    try:
        return SamplingParams(**given)
    except RequestError as e:
        field_ = str(e).split(" ", 1)[0]
        public = names.get(field_, field_)
        raise ApiError(400, str(e).replace(field_, f"'{public}'", 1), param=public) from None


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(stops):
        raise ApiError(400, "'stop': stop strings must not be empty", param="stop")
    return stops
