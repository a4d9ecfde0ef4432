from dimoe.cli import main

main()
