"""The flash store: its format, writer and store, and the async bundle reader with its read
backends. Knows bytes, not transformers; imports nothing above it."""
