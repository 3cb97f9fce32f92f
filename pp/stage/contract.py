"""The input contract of traced stages: which shapes a stage traced by `pp.pipeline` accepts.

The splitter exports the model with every dimension of its example inputs symbolic where the model
allows it (`torch.export` `Dim.AUTO`), so a stage's input shapes are expressions such as (s0, s1, 16)
plus the conditions the model put on them while it was traced (s1 >= 2, s0 % 2 == 0, ...). A step's
inputs are checked against that contract once per new shape, before anything is sent; a shape the
traced graph cannot take is a ValueError, never a silently wrong number.
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Sequence

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


class InputSpec(NamedTuple):
    """What one stage input must be: its name for messages, dtype, and per dimension an int (fixed by
    the model) or a sympy expression over the traced input sizes."""

    name: str
    dtype: torch.dtype
    dims: tuple
    arg: str = "x"   # the placeholder's own name, for sizes in messages: x.shape[0]


def dynamic_shapes(forward: Any, args: tuple, kwargs: dict) -> dict | None:
    """`torch.export` dynamic_shapes marking every dimension of size >= 2 of every tensor input as
    `Dim.AUTO` (symbolic unless the model fixes it; export always fixes sizes 0 and 1). None where the
    inputs cannot be matched to forward's parameters by name."""
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d, n in enumerate(x.shape) if n >= 2} or None
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def graph_input_specs(module: fx.GraphModule) -> list:
    """The InputSpec of each placeholder of a traced stage graph (None for non-tensor inputs)."""
    vals = [(n.name, n.meta.get("val")) for n in module.graph.nodes if n.op == "placeholder"]
    return [spec_of(f"input {i} ({name!r})", v, name) for i, (name, v) in enumerate(vals)]


def is_symbolic(node: Any) -> bool:
    """Whether a graph node computes a size (a SymInt and the like), not a tensor."""
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), _SYM_TYPES)


def expr_of(size: Any) -> sympy.Expr:
    """The sympy expression of one traced size (an int or a SymInt)."""
    if isinstance(size, _SYM_TYPES):
        return size.node.expr
    return sympy.Integer(int(size))


def spec_of(name: str, val: Any, arg: str = "x") -> InputSpec | None:
    """The InputSpec of a placeholder's traced value, None for non-tensor values."""
    if not isinstance(val, torch.Tensor):
        return None
    dims = tuple(int(d) if not isinstance(d, torch.SymInt) else d.node.expr for d in val.shape)
    return InputSpec(name, val.dtype, tuple(_plain(d) for d in dims), arg)


def _plain(d: Any) -> Any:
    if isinstance(d, sympy.Expr) and d.is_Integer:
        return int(d)
    return d


def shape_guards(ep: torch.export.ExportedProgram, user_vals: Sequence[Any]) -> list:
    """The conditions the traced graph needs of its input sizes: the range of every input size symbol
    and every shape guard export recorded (as sympy relations over those symbols)."""
    symbols: set = set()
    for val in user_vals:
        if isinstance(val, torch.Tensor):
            for d in val.shape:
                if isinstance(d, torch.SymInt):
                    symbols |= d.node.expr.free_symbols
    if not symbols:
        return []
    guards: list = []
    for sym, vr in ep.range_constraints.items():
        if sym not in symbols:
            continue
        lower, upper = _finite(vr.lower), _finite(vr.upper)
        if lower is not None and lower > 0:
            guards.append(sympy.Ge(sym, lower))
        if upper is not None:
            guards.append(sympy.Le(sym, upper))
    env = next((d.node.shape_env for v in user_vals if isinstance(v, torch.Tensor)
                for d in v.shape if isinstance(d, torch.SymInt)), None)
    for guard in getattr(env, "guards", ()):
        expr = guard.expr
        if expr.free_symbols and expr.free_symbols <= symbols and expr not in guards:
            guards.append(expr)
    return guards


def _finite(bound: Any) -> int | None:
    """A range bound as an int, None where it is infinite."""
    if isinstance(bound, int) or getattr(bound, "is_Integer", False):
        return int(bound)
    return None


def check_shapes(stage: int, specs: Sequence[InputSpec | None], values: Sequence[Any], guards: Sequence,
                 source: str = "", autocast_dtype: torch.dtype | None = None) -> None:
    """ValueError unless `values` (tensors, or (shape, dtype) pairs) fit `specs` and `guards`.

    A dimension the model fixed must have that size; a symbolic one may take any size that meets
    the guards (sizes that one symbol names must agree). Under autocast a floating input may also
    come in `autocast_dtype`. `source` says where the values come from, e.g. " (from stage 0)".
    """
    bound: dict = {}      # symbol -> size given
    named: dict = {}      # symbol -> where it was first seen, as 'x.shape[0]'
    compound: list = []
    for spec, value in zip(specs, values):
        if spec is None:
            continue
        where = f"stage {stage} {spec.name}{source}"
        shape, dtype = _shape_dtype(value)
        if shape is None:
            raise ValueError(f"{where}: expected {_describe(spec)}, got the non-tensor value {value!r}")
        ok_dtype = dtype == spec.dtype or (autocast_dtype is not None and dtype == autocast_dtype
                                          and spec.dtype.is_floating_point)
        if not ok_dtype or len(shape) != len(spec.dims):
            raise ValueError(f"{where}: expected {_describe(spec)}, got {_describe_value(shape, dtype)}")
        for d, (want, got) in enumerate(zip(spec.dims, shape)):
            if isinstance(want, int):
                if want != got:
                    why = ("; torch.export fixes every dimension of size 0 or 1 in the example inputs, so "
                           "trace pipeline() with an example of at least 2 in that dimension"
                           if want in (0, 1) else "; the traced model fixes this size")
                    raise ValueError(f"{where}: expected {_describe(spec)}, got "
                                     f"{_describe_value(shape, dtype)}: dimension {d} must be {want}{why}")
            elif isinstance(want, sympy.Symbol):
                if bound.setdefault(want, got) != got:
                    raise ValueError(f"{where}: expected {_describe(spec)}, got {_describe_value(shape, dtype)}: "
                                     f"dimension {d} must equal {named[want]}, which is {bound[want]}")
                named.setdefault(want, f"{spec.arg}.shape[{d}]")
            else:
                compound.append((where, spec, shape, dtype, d, want, got))
    for where, spec, shape, dtype, d, want, got in compound:
        value = want.xreplace({s: sympy.Integer(v) for s, v in bound.items()})
        if value.is_Integer and int(value) != got:
            raise ValueError(f"{where}: expected {_describe(spec)}, got {_describe_value(shape, dtype)}: "
                             f"dimension {d} must be {_readable(want, named)} = {int(value)}")
    for guard in guards:
        if not guard.free_symbols <= bound.keys():
            continue
        try:
            holds = bool(guard.xreplace({s: sympy.Integer(v) for s, v in bound.items()}))
        except TypeError:  # sympy could not decide: not a shape this check can rule on
            continue
        if not holds:
            sizes = ", ".join(f"{named[s]} = {bound[s]}" for s in sorted(guard.free_symbols, key=str))
            traced = "; ".join(f"{spec.name} traced as {_describe(spec)}" for spec in specs if spec is not None)
            small = sorted(named[s] for s in guard.free_symbols if bound[s] < 2)
            way = (f"send sizes of at least 2 there ({', '.join(small)}; torch.export traces a size of 0 or 1 "
                   f"only as a fixed size, so no example covers it together with larger ones; for the batch "
                   f"dimension: a batch that gives each microbatch at least 2 rows, or fewer microbatches)"
                   if small else "send such sizes, or trace pipeline() with an example of the sizes you will send")
            raise ValueError(f"stage {stage} inputs{source} do not meet the traced model's shape condition "
                             f"{_readable(guard, named)} (here {sizes}; {traced}); the traced graph is only "
                             f"valid for sizes that meet it: {way}")


def _shape_dtype(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype):
        return tuple(value[0]), value[1]
    return None, None


def _describe(spec: InputSpec) -> str:
    """'a float32 tensor of shape (*, 6, 16)' (`*`: a size the model lets vary)."""
    return _describe_value(tuple("*" if isinstance(d, sympy.Symbol) else d for d in spec.dims), spec.dtype)


def _readable(expr: Any, named: dict) -> str:
    """A size expression with its symbols written as the input sizes they stand for (x.shape[0])."""
    return str(expr.xreplace({s: sympy.Symbol(n) for s, n in named.items()}))


def _describe_value(shape: Sequence, dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    article = "an" if name.startswith("int") else "a"
    return f"{article} {name} tensor of shape ({', '.join(map(str, shape))})"
