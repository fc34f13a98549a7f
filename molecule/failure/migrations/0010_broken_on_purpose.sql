-- A migration that fails on purpose at line 7 (division by zero, SQLSTATE 22012),
-- after a statement that succeeded: the engine must roll both back together.
CREATE TABLE public.molecule_failure_probe (id integer PRIMARY KEY);

INSERT INTO public.molecule_failure_probe VALUES (1);

SELECT 1 / 0;
