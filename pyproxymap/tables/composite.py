"""Tables made of other tables, ``type:{type:name, type:name, ...}``: unionmap and pipemap.

As in Postfix (dict_union, dict_pipe): components are opened directly, with
the instance flags of the whole; the whole takes its FIXED/PATTERN kind from
the first component; a component that fails a lookup fails the whole with its
error. A component folds the key it is given by its own kind, whatever the
kind of the whole, when the request asks for folding. (Postfix components fold
by the flags they were opened with: in proxymap, those of the client's first
request, which ask for folding only from clients that do not fold keys
themselves, i.e. with smtputf8_enable=no; the request's flags say the same.)
A component may answer later (return an awaitable): the lookup then turns
into a coroutine from that component on, and stays synchronous otherwise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from inspect import isawaitable

from ..wire.proxymap import FIXED, PATTERN
from .base import Maybe, OpenContext, Table, TableConfigError
from .source import balpar, brace_tokens, printable, refuse_writes
from .utf8layer import key_rejected

#: A lookup over components: yields each component's answer (maybe still to come),
#: is sent it back once ready, and returns the answer of the whole.
Steps = Generator[Maybe[bytes | None], bytes | None, bytes | None]


class ComposedTable(Table):
    """The components and what every composed type shares; subclasses say how to combine."""

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        spec = printable(ctx.spec)
        refuse_writes(ctx)
        name = ctx.name
        length = balpar(name)
        inside = name[1 : length - 1] if 2 < length == len(name) else ""
        names = list(brace_tokens(inside))
        if not names or any(":" not in component for component in names):
            raise TableConfigError(f'bad syntax: "{spec}"; need "{ctx.type}:{{type:name...}}"')
        if ctx.open_nested is None:
            raise TableConfigError(f"{spec}: component tables cannot be opened here")
        self.components: list[Table] = []
        try:
            for component in names:
                self.components.append(ctx.open_nested(component, ctx.instance_flags))
        except BaseException:
            self.close()
            raise
        self.flags = ctx.instance_flags | (self.components[0].flags & (FIXED | PATTERN))

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        if key_rejected(self.ctx, key):
            return None
        return _run(self._steps(key, flags))

    def _steps(self, key: bytes, flags: int) -> Steps:
        raise NotImplementedError

    @staticmethod
    def _ask(table: Table, key: bytes, flags: int) -> Maybe[bytes | None]:
        """A component's answer, the key folded as the service would fold it for that table."""
        return table.lookup(table.folded(key, flags), flags)

    def changed(self) -> bool:
        return any(table.changed() for table in self.components)

    def close(self) -> None:
        for table in self.components:
            table.close()


def _run(steps: Steps) -> Maybe[bytes | None]:
    """Drive ``steps`` at once while components answer at once; else finish in a coroutine."""
    try:
        answer = next(steps)
        while not isawaitable(answer):
            answer = steps.send(answer)
    except StopIteration as done:
        return done.value
    return _finish(steps, answer)


async def _finish(steps: Steps, answer: Awaitable[bytes | None]) -> bytes | None:
    pending: Maybe[bytes | None] = answer
    try:
        while True:
            pending = steps.send(await pending if isawaitable(pending) else pending)
    except StopIteration as done:
        return done.value
