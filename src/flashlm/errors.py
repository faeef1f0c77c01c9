"""Named errors. Every message says what is wrong and what to do about it."""

from __future__ import annotations


class FlashLMError(Exception):
    """Base class of every error flashlm raises on purpose."""


class ConfigError(FlashLMError, ValueError):
    """A setting has a value flashlm cannot use."""


class InvalidRequestError(FlashLMError, ValueError):
    """A request (prompt, sampling settings, max_tokens ...) is malformed."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


class UnknownModelError(FlashLMError, LookupError):
    """A built-in model name is not known, or its package is not installed."""


class SourceCheckpointError(FlashLMError):
    """A conversion source (checkpoint dir, GGUF file) is missing or unreadable."""


class ModelPartError(SourceCheckpointError):
    """A built-in model's installed part is missing, of the wrong size or damaged; the message names
    the package to reinstall."""


class UnsupportedArchitectureError(FlashLMError):
    """The checkpoint's architecture (model_type or a config variant) is not implemented."""


class StoreExistsError(FlashLMError, FileExistsError):
    """The conversion target already exists and --force was not given."""


class CheckpointFormatError(FlashLMError):
    """A flash store on disk is missing, damaged, or of another format version."""


class StoreVersionError(CheckpointFormatError):
    """A flash store was written with a format version this flashlm cannot read."""


class AlignmentError(FlashLMError, ValueError):
    """A destination buffer is not aligned as O_DIRECT reads require."""


class NeuronReadError(FlashLMError, OSError):
    """Reading FFN bundles from flash failed (I/O error, short read, truncated file).

    Raised by `flashlm.io.reader.BundleReader` with `layer`, `neurons` (first, last id of the
    failed range) and `filename` set; `errno` is the OS error number where there was one.
    """

    def __str__(self) -> str:
        # OSError's str with a filename set is "[Errno N] strerror: 'file'": without an errno (a
        # failure that was not an OSError) that form printed "[Errno None] None: 'file'" and lost
        # the message. The message names the file already.
        if self.errno is None and self.args:
            return str(self.args[0])
        return super().__str__()


class BundleChecksumError(NeuronReadError):
    """Bundles read from flash do not match their CRC32 in the store (the file was damaged)."""


class ReadRequestError(FlashLMError, ValueError):
    """A bundle read request is malformed: layer, neuron ids or slots out of range, bad shapes."""


class DuplicateNeuronError(ReadRequestError):
    """A bundle read request names the same neuron id (or the same slot) twice."""


class ReaderClosedError(FlashLMError, RuntimeError):
    """The bundle reader was closed (before or during this read); open a new one."""


class MemoryBudgetError(FlashLMError):
    """The memory budget is below what the engine needs (`minimum`: the bytes it would need)."""

    def __init__(self, message: str, minimum: int | None = None) -> None:
        super().__init__(message)
        self.minimum = minimum


class MissingDependencyError(FlashLMError):
    """An optional package or program a feature needs is not installed. flashlm never installs
    one itself: the message names what to install (or the option that does without it)."""


class TraceFormatError(FlashLMError, ValueError):
    """A trace file (`--trace`) is not a flashlm trace, or a line of it does not follow the schema."""


class TokenizerMissingError(FlashLMError):
    """The store has no tokenizer, so text prompts cannot be encoded."""


class PromptCacheFileError(FlashLMError):
    """A saved prompt cache file cannot be read or written, or belongs to another store."""


class EngineClosedError(FlashLMError, RuntimeError):
    """The engine was closed; open a new one."""


class EngineDeadError(FlashLMError, RuntimeError):
    """The engine hit an unrecoverable fault; open a new one."""


class NonFiniteLogitsError(FlashLMError, ArithmeticError):
    """The model produced NaN or infinite logits: damaged weights (run `flashlm verify`) or
    overflow in a half-precision compute dtype. The request is aborted, not answered with garbage."""
