"""`python -m apps.menubar` (and the py2app bundle's main script, hence the absolute import)."""

try:
    from apps.menubar.app import main
except ModuleNotFoundError as e:
    if e.name != "rumps":
        raise
    raise SystemExit("the menu-bar app needs macOS and rumps: pip install -e '.[app]'") from e

if __name__ == "__main__":
    main()
