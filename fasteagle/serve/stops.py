"""Stop strings matched across token boundaries.

Text arrives in pieces (one per token). `StopMatcher.push` returns the part of the text that can be shown now: it
holds back the longest tail that could still grow into a stop string, so a stop string split over several tokens
is caught, and the shown text never contains a stop string or any part of one. Once a stop string is complete,
the text before it is released and the matcher reports the stop.
"""


class StopMatcher:
    def __init__(self, stops=()):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to show now, whether a stop string has completed)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            shown, self.pending = self.pending[: min(hits)], ""
            return shown, True
        keep = self._held_back()
        shown, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return shown, False

    def flush(self) -> str:
        """The generation ended without a stop: release what was held back."""
        shown, self.pending = self.pending, ""
        return shown

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:n]):
                    longest = n
                    break
        return longest
