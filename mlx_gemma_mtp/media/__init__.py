"""Images and audio in a prompt: decoding files, the reference processors, and placeholder expansion."""
