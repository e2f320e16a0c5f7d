"""The submit stage: posting results to the competition server (posting, submission), the
append-only history of what the server answered (history) and a local stand-in server (scorer).

May import: the foundations, clipcore.data and clipcore.ranking."""
