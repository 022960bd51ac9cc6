"""Every error a person can fix: what is wrong and what to do, in the message.

Scripts catch `UserError` at their top (`qwen.scripts.exit_on_user_error`), print the message on one line
and exit 2; a server answers 4xx. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake a person can fix (a path, a flag, a file's content); the message says what to do."""


class CheckpointError(UserError):
    """A checkpoint (or a device / dtype choice) that cannot be loaded."""


class DataError(UserError):
    """A data file (fine-tuning, calibration, evaluation) that cannot be used: names the file and the sample."""


class UsageError(UserError):
    """Flags that cannot work together, or a value out of range."""


class NotAChatModelError(UsageError, ValueError):
    """A chat feature asked of a base model (generation_config.chat_format is not "chatml")."""


class ReActError(ValueError):
    """A request that cannot be folded into the ReAct prompt (tools, tool calls, messages); the message says what
    is wrong (HTTP 400, or a fine-tuning data error naming the sample)."""


# Not a person's mistake: the model failed while answering. The servers answer 500 / 503 and go on.


class GenerationError(RuntimeError):
    """The engine failed a request (e.g. out of memory); other requests go on."""


class ServerShutdownError(GenerationError):
    """The server stopped the request because it is shutting down (its grace period ran out)."""


# The engine's refusals of a request, each answered by the servers with its own status.


class QueueFullError(RuntimeError):
    """Too many requests are waiting or running; the server answers 429."""


class EngineStoppedError(RuntimeError):
    """The engine was shut down (the server is stopping); the server answers 503."""


class PromptTooLongError(ValueError):
    """The prompt does not fit the context window; the server answers 400."""


__all__ = [
    "CheckpointError", "DataError", "EngineStoppedError", "GenerationError", "NotAChatModelError", "PromptTooLongError",
    "QueueFullError", "ReActError", "ServerShutdownError", "UsageError", "UserError",
]
