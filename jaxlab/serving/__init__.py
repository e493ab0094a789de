"""An OpenAI-compatible server over the generation Engine (chat and text completions, streaming,
tool calls). :mod:`jaxlab.serving.tools` holds the tool-call prompt format and its parsers."""
