"""`flashlm chat`: a Textual chat app built only on the public streaming API.

Needs the `tui` extra (`pip install 'flashlm[tui]'`, i.e. textual).
"""

from __future__ import annotations

from flashlm.tui.app import ChatApp, ChatSettings

__all__ = ["ChatApp", "ChatSettings"]
