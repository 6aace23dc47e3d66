from qpcell.cli import main

main()
