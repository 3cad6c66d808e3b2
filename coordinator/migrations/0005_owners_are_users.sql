-- A workspace's owner is a user by name. Removing a user used to leave their name on the workspaces
-- they owned, so a later user of the same name would have inherited them: take such names off.
UPDATE workspaces SET owner = NULL WHERE owner IS NOT NULL AND owner NOT IN (SELECT name FROM users);
