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
