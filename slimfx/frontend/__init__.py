"""How programs come in (fx / export frontends) and how people drive slimfx (API, CLI)."""
