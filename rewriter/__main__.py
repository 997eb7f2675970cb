from attnrewrite.cli import console_main

console_main()
