"""What chat clients expect on top of generated text: tool calls parsed out of the model's
output (``tool_parsers``) and the reasoning part split off (``reasoning``). Plain Python
on text, used by the HTTP shim and importable by SDK users."""
