DROP TABLE auth.erased_subjects;
DROP TABLE auth.erasure_outbox;
