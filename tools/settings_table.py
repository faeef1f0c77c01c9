"""Print README's EngineConfig settings table, generated from the fields' declarations
(`flashlm.pipeline.config`); tests/test_settings.py fails while README's differs.

    python tools/settings_table.py
"""

from flashlm.cli.settings import settings_table

if __name__ == "__main__":
    print(settings_table())
