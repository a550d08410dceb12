"""The one error type for bad input. The CLI prints it as a single line and exits 2."""


class InputError(Exception):
    """Bad input: a file, line or object and the field that is wrong.

    ``where`` is e.g. ``"rules.txt:12"`` or ``"cluster.yaml: Service default/web"``;
    ``field`` names what is wrong in it (may be empty).
    """

    def __init__(self, message: str, where: str = "", field: str = ""):
        self.message = message
        self.where = where
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.where, self.field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


def read_input(path, expected: str) -> str:
    """The UTF-8 text of an input file; any reason it cannot be read is an InputError.

    ``expected`` names what the file should be, e.g. "an iptables-save file".
    """
    from pathlib import Path

    name = str(path)
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError("no such file", name) from None
    except IsADirectoryError:
        raise InputError(f"is a directory, not {expected}", name) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", name) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", name) from None
