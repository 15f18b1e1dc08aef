"""Typed errors. The library raises them; the CLI layer (chatgot_jax.cli) words them."""


class UserError(Exception):
    """Bad input the user can fix. The message is one line that says what to do."""


class InvalidArgument(UserError):
    """A bad value for the keyword argument `param` of a library function.

    The message names the parameter; a command that exposes it as a flag
    (max_new_tokens -> --max-new-tokens) names the flag instead.
    """

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(f"{param} {problem}")


class RunError(Exception):
    """A run that cannot go on (diverged, disk full): one line, exit status 1."""


class Diverged(RunError):
    """The loss became NaN or infinite: training stops before saving that state."""
