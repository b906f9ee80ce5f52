"""An axis-aligned pixel rectangle, shared by face detection and crop framing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """Pixel rectangle ``[left, right) x [top, bottom)`` in an image's coordinates."""

    left: int
    top: int
    right: int
    bottom: int

    @classmethod
    def from_xywh(cls, x: float, y: float, width: float, height: float) -> Box:
        return cls(round(x), round(y), round(x + width), round(y + height))

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def centre(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2

    def scaled(self, factor: float) -> Box:
        """The same rectangle in an image resized by ``factor``."""
        return Box(
            round(self.left * factor),
            round(self.top * factor),
            round(self.right * factor),
            round(self.bottom * factor),
        )

    def contains(self, other: Box) -> bool:
        return (
            self.left <= other.left
            and self.top <= other.top
            and other.right <= self.right
            and other.bottom <= self.bottom
        )

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)``, Pillow's crop-box order."""
        return self.left, self.top, self.right, self.bottom

    def __str__(self) -> str:
        return f"({self.left}, {self.top}, {self.right}, {self.bottom})"
