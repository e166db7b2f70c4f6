"""The Gradio web chat: `build_app(loop)` makes the page, `launch_ui()` serves it on its own,
`mount_ui()` puts it beside the OpenAI-compatible API.

Importing `app` pulls in nothing heavy; `app.ui` and `app.launch` import gradio.
"""

from app.chat import ChatSettings, Reply, make_chat_fn, stream_reply

__all__ = ["ChatSettings", "Reply", "make_chat_fn", "stream_reply"]
